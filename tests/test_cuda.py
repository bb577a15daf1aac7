"""Tier 4: the GPU code paths (bitsandbytes CUDA kernels, bf16 compute). CI has no GPU and skips
these; run them on a GPU machine with `pytest -m cuda`."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import build_app
from service.base_model import load_base
from service.engine import EngineRequest, SamplingParams
from service.metrics import Metrics
from service.runtime import load_runtime
from tests.factories import FAMILIES, preload_adapters, tiny_settings
from tests.service.engine.test_families import (  # noqa: F401  (worlds: a fixture)
    STATIC_UNSUPPORTED,
    assert_peft_tokens,
    runtime_for,
    serve_mixed_batch,
    worlds,
)
from training.config import build_config
from training.train import run as train_run

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
PROMPT = (5, 17, 42, 99, 7, 3)


def settings(tiny, cache_dir, quantization):
    return tiny_settings(tiny, cache_dir, quantization=quantization, device="cuda")


async def _generate(engine, adapter, max_tokens=10):
    await engine.start()
    try:
        request = EngineRequest("r", PROMPT, adapter, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        return [t for out in [o async for o in engine.generate(request)] for t in out.token_ids]
    finally:
        await engine.stop()


@pytest.mark.parametrize("quantization", ["nf4", "int8", "bf16"])
def test_quantized_modes_load_on_cuda_with_bf16_compute(tiny, cache_dir, quantization):
    base = load_base(str(tiny.base_dir), quantization=quantization, device="cuda", cache_dir=cache_dir)
    assert next(base.model.parameters()).device.type == "cuda"
    with torch.no_grad():
        logits = base.model(input_ids=torch.tensor([PROMPT], device="cuda")).logits
    assert torch.isfinite(logits).all()


def test_engine_greedy_matches_generate_on_cuda_fp32(tiny, cache_dir):
    runtime = preload_adapters(load_runtime(settings(tiny, cache_dir, "fp32"), Metrics()))
    model = runtime.engine.runner.model
    for adapter in (None, "alpha"):
        got = asyncio.run(_generate(runtime.engine, adapter))
        if adapter:
            model.set_adapter(adapter)
            ctx = torch.no_grad()
        else:
            ctx = model.disable_adapter()
        with ctx, torch.no_grad():
            ref = model.generate(
                torch.tensor([PROMPT], device="cuda"),
                max_new_tokens=len(got),
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert got == ref[0, len(PROMPT) :].tolist()


def test_nf4_adapters_differ_from_base_on_cuda(tiny, cache_dir):
    runtime = load_runtime(settings(tiny, cache_dir, "nf4"), Metrics())
    outs = {a: asyncio.run(_generate(runtime.engine, a)) for a in (None, "alpha", "beta")}
    assert outs[None] != outs["alpha"] != outs["beta"]


def test_http_completion_on_cuda(tiny, cache_dir):
    app = build_app(settings(tiny, cache_dir, "nf4"))
    with TestClient(app) as client:
        for _ in range(600):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.1)
        r = client.post("/v1/completions", json={"model": "alpha", "prompt": "The capital", "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0


def test_every_graph_is_captured_at_start_and_none_under_traffic_on_cuda(tiny, cache_dir):
    """Issue #22, item 3: the start captures every (rows, width) bucket, so requests on both
    adapters and the base never wait for a capture."""
    from service.engine.kvcache.slots import _buckets, _widths

    app = build_app(settings(tiny, cache_dir, "nf4").model_copy(update={"kv_cache": "static", "max_batch_size": 4}))
    with TestClient(app) as client:
        for _ in range(600):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.1)
        for model in ("alpha", "beta", "tiny", "alpha"):
            r = client.post("/v1/completions", json={"model": model, "prompt": "The capital", "max_tokens": 70})
            assert r.status_code == 200, r.text
        registry = app.state.hotswap.metrics.registry
        kv = app.state.hotswap.context.engine.kv_cache
    assert registry.get_sample_value("hotswap_cuda_graph_startup_seconds") > 0
    assert registry.get_sample_value("hotswap_cuda_graph_capture_seconds_count") == 0
    assert kv.graphs and kv.captures == len(_buckets(4)) * len(_widths(kv.max_len))


def test_qlora_training_steps_on_cuda(tiny, tmp_path, cache_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": f"Say {w}", "response": w}) + "\n"
            for w in ["Paris", "Rome", "Oslo", "Lima"] * 10
        )
    )
    config = build_config(
        "dolly",
        tmp_path / "cuda-dolly",
        overrides={
            "data": {"source": str(data), "eval_size": 4},
            "model": {
                "base": str(tiny.base_dir),
                "quantization": "nf4",
                "device": "cuda",
                "compute_dtype": "auto",
                "cache_dir": cache_dir,
            },
            "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
            "train": {
                "max_steps": 10,
                "batch_size": 4,
                "learning_rate": 1e-2,
                "warmup_steps": 0,
                "save_steps": 5,
                "logging_steps": 1,
                "max_length": 64,
            },
        },
    )
    metrics = train_run(config)
    assert metrics["eval_loss_adapter"] < metrics["eval_loss_base"]


MIXED = [
    ((5, 17, 42, 99, 7, 3), None, 12),
    ((8, 9), "alpha", 5),
    ((100, 101, 102, 103, 104, 105), "beta", 20),
    ((33,), "alpha", 9),
    ((250, 251, 252, 12, 13), None, 16),
    ((60, 61, 62), "beta", 3),
]


def test_static_kv_with_cuda_graphs_is_token_identical_on_cuda_fp32(tiny, cache_dir):
    from service.engine.batched import BatchedEngine
    from service.engine.config import EngineConfig

    runtime = preload_adapters(load_runtime(settings(tiny, cache_dir, "fp32"), Metrics()))
    runner = runtime.engine.runner
    config = EngineConfig(max_context=256, max_batch_size=4, kv_cache="static", cuda_graphs=True)
    engine = BatchedEngine(runner, config)

    async def main():
        await engine.start()
        try:

            async def one(i, prompt, adapter, n):
                await asyncio.sleep(0.01 * i)  # later requests join a running batch
                request = EngineRequest(f"r{i}", prompt, adapter, SamplingParams(max_tokens=n, temperature=0.0))
                return [t for out in [o async for o in engine.generate(request)] for t in out.token_ids]

            return await asyncio.gather(*(one(i, *m) for i, m in enumerate(MIXED)))
        finally:
            await engine.stop()

    results = asyncio.run(main())
    assert engine.kv_cache.graphs and engine.kv_cache.captures > 0  # captured, never fell back to eager
    model = runner.model
    for got, (prompt, adapter, n) in zip(results, MIXED, strict=True):
        if adapter:
            model.set_adapter(adapter)
        ctx = model.disable_adapter() if adapter is None else torch.no_grad()
        with ctx, torch.no_grad():
            ref = model.generate(
                torch.tensor([prompt], device="cuda"),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert got == ref[0, len(prompt) :].tolist(), (prompt, adapter)


@pytest.mark.parametrize("quantization", ["nf4", "int8", "bf16"])
def test_captured_decode_step_matches_eager_on_cuda(tiny, cache_dir, quantization):
    from service.engine.kvcache import SlotKV

    runner = preload_adapters(load_runtime(settings(tiny, cache_dir, quantization), Metrics())).engine.runner
    prompts = [[5, 17, 42, 99], [8, 9, 10, 11], [7, 7, 7, 7]]
    adapters = [None, "alpha", "beta"]
    outs = {}
    for graphs in (False, True):
        kv = SlotKV(runner, 4, 64, cuda_graphs=graphs)
        logits, cache, mask = runner.prefill_batch(prompts, adapters)
        kv.join(cache, mask)
        tokens = logits.argmax(-1).tolist()
        steps = []
        for step in range(3):
            out = kv.decode(tokens, [4 + step] * 3, adapters)
            steps.append(out)
            tokens = out.argmax(-1).tolist()
        outs[graphs] = torch.stack(steps)
        # LLM.int8() syncs with the host inside every layer: never captured, eager instead.
        captured = graphs and quantization != "int8"
        assert kv.graphs == captured and kv.captures == (1 if captured else 0)
    scale = outs[False].abs().max()
    assert torch.isfinite(outs[True]).all()
    assert (outs[True] - outs[False]).abs().max() <= 1e-2 * scale


def test_adapter_churn_keeps_the_captured_graphs_on_cuda(tiny, cache_dir, tmp_path):
    from tests.service.engine.test_kvcache import check_adapter_churn

    runner = preload_adapters(load_runtime(settings(tiny, cache_dir, "fp32"), Metrics())).engine.runner
    check_adapter_churn(runner, tiny, tmp_path, emulate=False, atol=1e-4)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in STATIC_UNSUPPORTED])
def test_family_matrix_on_the_static_cache_with_cuda_graphs(worlds, cache_dir, family):  # noqa: F811
    """tests/service/test_families.py's matrix with real CUDA graphs: fp32, token-identical."""
    runtime = runtime_for(worlds, family, cache_dir, device="cuda")
    runner, tokenizer = runtime.engine.runner, runtime.tokenizer
    assert_peft_tokens(runner, tokenizer, serve_mixed_batch(runner, tokenizer, "static"), family)
