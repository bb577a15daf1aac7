"""The static (slot) KV cache: joining left-padded rows, compaction when rows leave, and when its
CUDA-graph steps are captured again. Token identity with single requests is tested through the
engine (test_batched_engine.py, test_batched_smollm2.py); CUDA capture itself in test_cuda.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from service.engine import EngineRequest, SamplingParams
from service.engine.kvcache import SlotKV, static_kv_bytes, static_kv_unsupported
from service.engine.kvcache.slots import _buckets, _widths
from service.metrics import Metrics
from service.runtime import load_runtime
from tests.factories import (
    batched_engine,
    make_lora_adapter,
    make_residency,
    preload_adapters,
    run_engine,
    tiny_settings,
)

LAYERS, HEADS, DIM = 2, 3, 4


def padded_cache(lengths: list[int], first_id: int = 0):
    """A left-padded cache whose row r holds 100 * (first_id + r) + position at each position."""
    width = max(lengths)
    cache = DynamicCache()
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    keys = torch.full((len(lengths), HEADS, width, DIM), -1.0)
    for r, length in enumerate(lengths):
        mask[r, width - length :] = 1
        for p in range(length):
            keys[r, :, width - length + p, :] = 100 * (first_id + r) + p
    for layer in range(LAYERS):
        cache.update(keys.clone(), -keys.clone(), layer)
    return cache, mask


def slot(kv: SlotKV, row: int, length: int) -> torch.Tensor:
    return kv.buffer[1, 0, row, :length, 0, 0]  # layer 1, keys, first head and channel


def test_join_puts_each_row_from_column_zero_and_retain_fills_the_holes_from_the_end():
    kv = SlotKV(SimpleNamespace(device=torch.device("cpu")), capacity=6, max_len=16)
    lengths = [3, 5, 2]
    kv.join(*padded_cache(lengths))
    kv.join(*padded_cache([4, 1], first_id=3))  # joins a running batch
    lengths += [4, 1]
    for r, length in enumerate(lengths):
        assert slot(kv, r, length).tolist() == [100 * r + p for p in range(length)]
        assert kv.buffer[1, 1, r, :length, 0, 0].tolist() == [-(100 * r + p) for p in range(length)]
    assert kv.rows == 5

    order = kv.retain([0, 2, 4])  # rows 1 and 3 leave: row 4 moves into slot 1
    assert order == [0, 4, 2] and kv.rows == 3
    for new, old in enumerate(order):
        assert slot(kv, new, lengths[old]).tolist() == [100 * old + p for p in range(lengths[old])]

    assert kv.retain([0, 1, 2]) == [0, 1, 2]  # nobody leaves: nothing moves
    assert kv.retain([2]) == [2] and slot(kv, 0, 2).tolist() == [200, 201]
    assert kv.retain([]) == [] and kv.rows == 0


def test_join_refuses_rows_beyond_capacity_or_length_or_of_another_shape():
    kv = SlotKV(SimpleNamespace(device=torch.device("cpu")), capacity=2, max_len=4)
    with pytest.raises(RuntimeError, match="capacity"):
        kv.join(*padded_cache([1, 2, 3]))
    with pytest.raises(RuntimeError, match="KV cache length"):
        kv.join(*padded_cache([5]))
    kv.reserve(LAYERS, HEADS + 1, DIM, torch.bfloat16)  # a wrong guess at start ...
    kv.join(*padded_cache([2]))  # ... costs a reallocation while no row runs
    assert kv.buffer.shape[-2] == HEADS and kv.buffer.dtype == torch.float32
    assert slot(kv, 0, 2).tolist() == [0, 1]
    kv._buffer = kv._buffer.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="does not match"):  # never under running rows
        kv.join(*padded_cache([2]))


def test_buckets_cover_every_row_count_and_width():
    assert _buckets(1) == [1] and _buckets(64) == [1, 2, 4, 8, 16, 32, 64] and _buckets(24)[-1] == 24
    assert _widths(2048) == [64, 128, 256, 512, 1024, 2048] and _widths(300) == [64, 128, 256, 300]
    assert _widths(10) == [10]


@pytest.fixture()
def runner(tiny, cache_dir):
    settings = tiny_settings(tiny, cache_dir)
    return preload_adapters(load_runtime(settings, Metrics())).engine.runner


def test_adapter_churn_is_copied_into_the_pool_without_recapturing(runner, tiny, tmp_path):
    check_adapter_churn(runner, tiny, tmp_path, emulate=True)


def check_adapter_churn(runner, tiny, tmp_path, *, emulate: bool, atol: float = 1e-5):
    """Loads, evictions and reloads write the adapter pool in place, so captured steps stay valid
    and compute what the eager fused path does; only a pool that must grow recaptures. With
    `emulate`, off CUDA: the same bucketed, statically routed steps, replayed eagerly (test_cuda
    runs it with real graphs)."""
    for name, seed, rank in (("gamma", 3, 4), ("wide", 4, 8), ("alpha-v2", 7, 4)):
        make_lora_adapter(tiny.base_dir, tmp_path / name, fingerprint=tiny.fingerprint, seed=seed, rank=rank)
    make_lora_adapter(
        tiny.base_dir,
        tmp_path / "mlp",
        fingerprint=tiny.fingerprint,
        seed=8,
        targets=("q_proj", "gate_proj", "down_proj"),
    )
    captures = []
    kv = SlotKV(runner, capacity=4, max_len=64, lora_slots=2, on_capture=captures.append)
    if emulate:
        kv.graphs = True
    assert kv.graphs
    prompts, adapters = [[5, 17, 42], [8, 9, 10]], ["alpha", "beta"]
    logits, cache, mask = runner.prefill_batch(prompts, adapters)
    kv.join(cache, mask)
    tokens = logits.argmax(-1).tolist()
    model = runner.model

    def step(position, adapters):
        graph = kv.decode(tokens, [position] * 2, adapters)
        kv.graphs = False
        eager = kv.decode(tokens, [position] * 2, adapters)  # the same keys written again
        kv.graphs = True
        assert torch.allclose(graph, eager, atol=atol), (graph - eager).abs().max()
        return graph

    before = step(3, adapters)
    assert kv.captures == 1  # one bucket (2 rows x 64 columns)
    model.delete_adapter("beta")  # evicted; gamma takes its slot
    model.load_adapter(str(tmp_path / "gamma"), adapter_name="gamma")
    step(4, ["alpha", "gamma"])
    model.delete_adapter("alpha")  # reloaded, changed on disk: new weights, same slot
    model.load_adapter(str(tmp_path / "alpha-v2"), adapter_name="alpha")
    after = step(5, ["alpha", "gamma"])
    assert kv.captures == 1 and len(captures) == 1  # no pause for any of it
    assert not torch.allclose(before, after)  # the steps did change (other positions, adapters)

    model.delete_adapter("gamma")
    model.load_adapter(str(tmp_path / "wide"), adapter_name="wide")  # rank 8 > the pool's 4
    step(6, ["alpha", "wide"])
    assert kv.captures == 2 and all(t > 0 for t in captures)  # a new pool: recaptured (metric)

    model.delete_adapter("wide")  # an adapter on more layers: PEFT wraps them, a new pool ...
    model.load_adapter(str(tmp_path / "mlp"), adapter_name="mlp")
    step(7, ["mlp", "alpha"])
    assert kv.captures == 3
    model.delete_adapter("mlp")  # ... and keeps the wrappers when it goes: no new pool
    model.load_adapter(str(tmp_path / "gamma"), adapter_name="gamma")
    step(8, ["gamma", "alpha"])
    model.delete_adapter("gamma")
    model.load_adapter(str(tmp_path / "mlp"), adapter_name="mlp")
    step(9, ["alpha", "mlp"])
    assert kv.captures == 3


def test_every_bucket_is_captured_at_start_and_none_under_traffic(tiny, cache_dir, tmp_path):
    """With CUDA graphs (replayed eagerly off CUDA), the start loads the first adapter, so the
    model is the PEFT model the graphs belong to, and captures every (rows, width) bucket; mixed
    traffic on both adapters and the base (the second swapped into a slot of the same shape)
    then captures nothing, and gives the dynamic cache's tokens (issue #22, item 3)."""
    from service.runtime import capture_at_start

    residency = make_residency(tiny, cache_dir, tmp_path, 2)
    captured = []
    engine = batched_engine(residency, kv_cache="static", on_stats=lambda stats: captured.extend(stats.captures))
    engine.kv_cache.graphs = True
    metrics = Metrics()
    capture_at_start(engine, residency, metrics)
    buckets = len(_buckets(4)) * len(_widths(256))  # the tiny engine: 4 rows, 256 positions
    assert residency.resident == ["alpha"] and engine.kv_cache.captures == buckets == 9
    assert metrics.registry.get_sample_value("hotswap_cuda_graph_startup_seconds") > 0

    async def body(engine):
        async def one(i, adapter):
            prompt = tuple(range(3 + i, 9 + 5 * i))
            params = SamplingParams(max_tokens=70 - 20 * i, temperature=0.0, ignore_eos=True)
            outputs = [o async for o in engine.generate(EngineRequest(f"r{i}", prompt, adapter, params))]
            return [t for o in outputs for t in o.token_ids]

        return await asyncio.gather(*(one(i, a) for i, a in enumerate(["alpha", "beta", None])))

    got = run_engine(engine, body)  # 3 rows, then 2 and 1; widths 64 and 128
    assert captured == [] and engine.kv_cache.captures == buckets
    assert got == run_engine(batched_engine(residency, kv_cache="dynamic"), body)


def test_adapters_the_pool_cannot_hold_run_eagerly(runner, tiny, tmp_path):
    make_lora_adapter(tiny.base_dir, tmp_path / "dora", fingerprint=tiny.fingerprint, seed=5, use_dora=True)
    runner.model.load_adapter(str(tmp_path / "dora"), adapter_name="dora")
    kv = SlotKV(runner, capacity=2, max_len=64)
    kv.graphs = True
    logits, cache = runner.prefill([5, 17, 42], "dora")
    kv.join(cache, torch.ones((1, 3), dtype=torch.long))
    out = kv.decode([int(logits.argmax())], [3], ["dora"])
    assert kv.captures == 0 and torch.isfinite(out).all()  # DoRA: PEFT's own path, eagerly
    runner.model.delete_adapter("dora")
    kv.decode([int(out.argmax())], [4], ["alpha"])
    assert kv.captures == 1  # gone again: the steps are captured


def test_static_kv_sizing_and_support(tiny):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny.base_dir)
    assert static_kv_unsupported(config) is None
    heads = config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    assert (
        static_kv_bytes(config, 8, 128, torch.bfloat16) == config.num_hidden_layers * 2 * 8 * 128 * heads * head_dim * 2
    )
    config.sliding_window = 32
    assert "full attention" in static_kv_unsupported(config)


def test_settings_choose_the_kv_cache(tiny, cache_dir):
    metrics = Metrics()

    def engine(**kw):
        settings = tiny_settings(tiny, cache_dir, **kw)
        return load_runtime(settings, metrics).engine

    assert type(engine()._kv).__name__ == "PaddedKV"  # auto on CPU: dynamic
    assert 'hotswap_engine_kv_cache_info{cuda_graphs="false",kv_cache="dynamic"} 1.0' in metrics.render().decode()
    static = engine(kv_cache="static", max_model_len=100)
    assert type(static._kv).__name__ == "SlotKV" and static._kv.max_len == 100 and static.max_context == 100
    # reserved at start, so a reservation that does not fit fails the start, not a request
    assert static._kv._buffer.shape[:4] == (2, 2, 16, 100)
    assert not static._kv.graphs  # no CUDA here
    text = metrics.render().decode()
    assert 'kv_cache="static"} 1.0' in text and 'kv_cache="dynamic"' not in text


def test_int8_layers_are_never_captured(tiny, cache_dir):
    from service.base_model import load_base
    from service.engine.kvcache import capture_unsupported

    int8 = load_base(str(tiny.base_dir), quantization="int8", device="cpu", cache_dir=cache_dir).model
    nf4 = load_base(str(tiny.base_dir), quantization="nf4", device="cpu", cache_dir=cache_dir).model
    assert "8-bit" in capture_unsupported(int8)
    assert capture_unsupported(nf4) is None


def test_max_model_len_bounds_what_the_api_accepts(tiny, cache_dir):
    import time

    from fastapi.testclient import TestClient

    from service.app import build_app

    settings = tiny_settings(tiny, cache_dir, kv_cache="static", max_model_len=12, allow_ignore_eos=True)
    with TestClient(build_app(settings)) as client:
        for _ in range(600):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.1)
        ok = client.post(
            "/v1/completions",
            json={"model": "alpha", "prompt": [5, 6, 7], "max_tokens": 9, "temperature": 0, "ignore_eos": True},
        )
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 9
        long = client.post("/v1/completions", json={"model": "alpha", "prompt": [5, 6, 7], "max_tokens": 10})
        assert long.status_code == 400 and long.json()["error"]["param"] == "max_tokens"
        assert "context of 12 tokens" in long.json()["error"]["message"]


def test_static_row_masks_follow_the_rows_every_pass(runner):
    from service.engine import PEFT_BASE
    from service.engine.lora import Layout, LoRARouting

    fused = runner.lora.fused_layers()
    masks = {}
    for names in (("alpha", PEFT_BASE), (PEFT_BASE, "beta"), ("alpha", PEFT_BASE)):
        fused.route(LoRARouting(names, Layout.POOL))
        masks.setdefault(names, []).append(fused.static_mask(2).clone())
    fused.route(None)
    first, again = masks[("alpha", PEFT_BASE)]
    assert torch.equal(first, again)  # the buffer rewritten in place never corrupts a composition
    assert first[1].sum() == 0 and first[0].sum() > 0  # the base row: no adapter
    assert not torch.equal(first, masks[(PEFT_BASE, "beta")][0])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_slot_steps_match_the_padded_cache_with_either_attention(tiny, cache_dir, attention):
    """SDPA takes the 4D mask as booleans; the eager attention adds it to the scores."""
    from service.base_model import load_base
    from service.engine.kvcache import PaddedKV
    from service.engine.runner import ModelRunner

    model = load_base(str(tiny.base_dir), quantization="fp32", device="cpu", cache_dir=cache_dir).model
    model.set_attn_implementation(attention)
    runner = ModelRunner(model, "cpu")
    assert (runner.additive_mask is None) == (attention == "sdpa")
    prompts = [[5, 17, 42, 99], [8, 9]]
    outs = []
    for kv in (PaddedKV(runner), SlotKV(runner, capacity=2, max_len=32)):
        logits, cache, mask = runner.prefill_batch(prompts, [None, None])
        kv.join(cache, mask)
        tokens, positions, steps = logits.argmax(-1).tolist(), [4, 2], []
        for _ in range(3):
            out = kv.decode(tokens, positions, [None, None])
            steps.append(out)
            tokens, positions = out.argmax(-1).tolist(), [p + 1 for p in positions]
        outs.append(torch.stack(steps))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_the_padded_cache_writes_each_step_into_spare_columns_and_never_into_shared_ones():
    """SpareLayer (padded.py): a step's column goes into the buffer's spare in place (no copy of
    the cache), the values are a concatenation's, and keys replaced from outside (rows joined,
    left or cut) or a view handed out earlier are never written through."""
    from transformers.cache_utils import DynamicLayer

    from service.engine.kvcache.padded import SpareLayer

    def column(value, rows=2):
        return torch.full((rows, HEADS, 1, DIM), float(value))

    plain, layer = DynamicLayer(), None
    plain.update(column(0), column(0))
    layer = SpareLayer.adopt(plain)
    expected = plain.keys
    pointers = set()
    for step in range(1, 40):
        keys, _ = layer.update(column(step), column(-step))
        expected = torch.cat([expected, column(step)], dim=2)
        assert torch.equal(keys, expected) and torch.equal(layer.values, -expected)
        pointers.add(keys.data_ptr())
    assert len(pointers) == 2  # one buffer at the first step, one more when its 32 spare ran out

    # Columns cut (padding in every row): a view into the buffer that starts later.
    layer.keys, layer.values = layer.keys[..., 5:, :], layer.values[..., 5:, :]
    expected = torch.cat([expected[..., 5:, :], column(98)], dim=2)
    assert torch.equal(layer.update(column(98), column(-98))[0], expected)
    # A row left: a copy (index_select); a view handed out before is never written through.
    before = layer.keys
    snapshot = before.clone()
    layer.keys, layer.values = layer.keys[1:], layer.values[1:]
    keys, _ = layer.update(column(99, rows=1), column(-99, rows=1))
    assert torch.equal(before, snapshot)
    assert torch.equal(keys, torch.cat([expected[1:], column(99, rows=1)], dim=2))
    assert SpareLayer.adopt(plain) is not plain and type(SpareLayer.adopt(layer)) is SpareLayer
