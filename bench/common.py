"""What the benchmarks share: the base and its random adapters, prompts, the service started
over HTTP with streaming clients, Prometheus sums, percentiles, a free port.

Moved out of bench/throughput.py (issue #32): every bench imported its helpers from there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service.settings import DEFAULT_MODEL


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The base and its random adapters: options shared with bench.step."""
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--quantization", default="nf4", choices=["nf4", "int8", "bf16", "fp32"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cache-dir", type=Path, default=Path("~/.cache/hotswap").expanduser())
    p.add_argument("--adapters", type=int, default=2, help="random LoRA adapters besides the base")


def make_adapters(source, directory: Path, count: int) -> list[str]:
    """Random LoRA packages (rank 16, all linear layers) for the loaded base, as training makes."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from service.adapters.manifest import AdapterManifest

    config = AutoConfig.from_pretrained(source.path)
    names = []
    for i in range(count):
        name = f"bench-{i}"
        with torch.device("meta"):
            peft_model = get_peft_model(
                AutoModelForCausalLM.from_config(config), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
            )
        generator = torch.Generator().manual_seed(i)
        weights = {
            k: (torch.randn(v.shape, generator=generator) * 0.02).to(torch.bfloat16)
            for k, v in get_peft_model_state_dict(peft_model).items()
        }
        out = directory / name
        out.mkdir(parents=True)
        save_file(weights, out / "adapter_model.safetensors")
        peft_model.peft_config["default"].save_pretrained(out)
        AdapterManifest(
            name=name,
            base_model={"id": source.served_id, "fingerprint": source.fingerprint},
            prompt_template="{{ text }}",
            input_fields=["text"],
        ).write(out)
        names.append(name)
    return names


def load_with_adapters(args) -> tuple:
    """(base, model with the adapters attached, adapter names, their directory): the base loaded
    as the service loads it, and --adapters random packages made for it."""
    from service.adapters.registry import AdapterRegistry
    from service.base_model import load_base

    base = load_base(args.model, quantization=args.quantization, device=args.device, cache_dir=args.cache_dir)
    adapter_dir = Path(tempfile.mkdtemp(prefix="hotswap-bench-"))
    names = make_adapters(base.source, adapter_dir, args.adapters)
    registry = AdapterRegistry(adapter_dir, base_id=base.source.served_id, base_fingerprint=base.source.fingerprint)
    registry.scan()
    return base, registry.attach(base.model), names, adapter_dir


def make_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    text = (
        "In a quiet harbour town, the lighthouse keeper wrote letters to the sea every night, "
        "describing ships, storms, gulls and the small lives of the people on the shore. "
    )
    ids = tokenizer(text * (length // 8 + 4)).input_ids
    return [ids[i % 7 : i % 7 + length] for i in range(count)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def service_clients(url, model_id, prompts, adapters, new_tokens, extra: dict | None = None) -> dict:
    import httpx

    async def one(client, ids, adapter) -> tuple[int, float, list[float]]:
        body = {
            "model": model_id,
            "adapter": adapter or "base",
            "prompt": ids,
            "max_tokens": new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            **(extra or {}),
        }
        sent = time.perf_counter()
        arrivals, tokens = [], 0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    arrivals.append(time.perf_counter())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
        return tokens, arrivals[0] - sent, gaps

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(client, p, a) for p, a in zip(prompts, adapters, strict=True)))
        seconds = time.perf_counter() - started
    ttft = [r[1] for r in results]
    itl = [g for r in results for g in r[2]]
    return {
        "tokens": sum(r[0] for r in results),
        "seconds": seconds,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(itl, 50),
        "itl_p99": pct(itl, 99),
    }


def start_service(
    args, adapter_dir: Path, port: int, max_batch: int, guardrails: str | None = None, env: dict | None = None
) -> subprocess.Popen:
    """`python -m service` on the bench's base and adapters, ready; `env`: more HOTSWAP_* settings."""
    import httpx

    env = {
        **os.environ,
        "HOTSWAP_ALLOW_IGNORE_EOS": "true",  # the benches generate exactly their token counts
        "HOTSWAP_ADAPTER_DIR": str(adapter_dir),
        "HOTSWAP_CACHE_DIR": str(args.cache_dir),
        "HOTSWAP_MAX_BATCH_SIZE": str(max_batch),
        "HOTSWAP_LOG_LEVEL": os.environ.get("HOTSWAP_LOG_LEVEL", "warning"),
        **(env or {}),
    }
    flags = ["--guardrails", guardrails] if guardrails else []
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--model",
            args.model,
            "--quantization",
            args.quantization,
            "--device",
            args.device,
            "--port",
            str(port),
            *flags,
        ],
        env=env,
    )
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the service exited during start")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("the service did not become ready")


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples in /metrics text: every label set, or those that
    carry all of `labels`."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " ")) and all(w in line.rsplit(" ", 1)[0] for w in wanted)
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
