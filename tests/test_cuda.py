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
from service.settings import Settings
from tests.factories import preload_adapters
from training.config import build_config
from training.train import run as train_run

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
PROMPT = (5, 17, 42, 99, 7, 3)


def settings(tiny, cache_dir, quantization):
    return Settings(model=str(tiny.base_dir), quantization=quantization, device="cuda",
                    adapter_dir=tiny.adapter_dir, cache_dir=cache_dir)


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
            ref = model.generate(torch.tensor([PROMPT], device="cuda"), max_new_tokens=len(got),
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        assert got == ref[0, len(PROMPT):].tolist()


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


def test_qlora_training_steps_on_cuda(tiny, tmp_path, cache_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "response": w}) + "\n"
                            for w in ["Paris", "Rome", "Oslo", "Lima"] * 10))
    config = build_config("dolly", tmp_path / "cuda-dolly", overrides={
        "data": {"source": str(data), "eval_size": 4},
        "model": {"base": str(tiny.base_dir), "quantization": "nf4", "device": "cuda", "compute_dtype": "auto",
                  "cache_dir": cache_dir},
        "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
        "train": {"max_steps": 10, "batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 0,
                  "save_steps": 5, "logging_steps": 1, "max_length": 64},
    })
    metrics = train_run(config)
    assert metrics["eval_loss_adapter"] < metrics["eval_loss_base"]
