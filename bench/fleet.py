"""`python -m bench.fleet`: many adapters on one base; slots, the host tier, reloads under load.

Three measurements, in one run, on --adapters random rank-16 all-linear adapters made for the
loaded base (issue #21):

1. **Swap-in** (in process, nothing else running): the time to put an adapter into a device
   slot from the host tier (an in-place copy) and from disk (read, hash check, parse, copy),
   p50 and p90 over --swaps adapters.
2. **Zipf fleet** over HTTP: --clients clients each send requests one after another, the
   adapter drawn from a Zipf(--zipf) popularity over all adapters (the same draw for both runs),
   against a service with --slots device slots and --host-slots in host memory, then against a
   service with every adapter resident (preloaded into as many slots as adapters). Prints the
   ratio of their tok/s, failed requests and TTFT p50/p99.
3. **Reload under load**: --clients clients stream greedy completions on one adapter while its
   other version is loaded --reloads times through `POST /v1/load_lora_adapter` (load_inplace);
   two versions with different greedy outputs: every response must be entirely one of them.

The two services run one after the other, never beside each other (2 cores: two torch
processes thrash).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import add_model_args, free_port, make_adapters, make_prompts, metric_sum, pct, start_service

ADMIN = "bench-admin-key-0123456789"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.set_defaults(adapters=100)
    p.add_argument("--slots", type=int, default=8, help="MAX_RESIDENT_ADAPTERS")
    p.add_argument("--host-slots", type=int, default=32, help="MAX_CPU_ADAPTERS")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=12, help="requests per client in the Zipf runs")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--reloads", type=int, default=10)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: swap, zipf, reload")
    return p


# --- 1. swap-in latency ------------------------------------------------------------------------


def swap_latency(args, adapter_dir: Path, names: list[str]) -> dict:
    """p50/p90 of putting an adapter into a slot, from disk and from the host tier."""
    from service.adapters.registry import AdapterRegistry
    from service.base_model import load_base
    from service.engine.residency import AdapterResidency

    base = load_base(args.model, quantization=args.quantization, device=args.device, cache_dir=args.cache_dir)
    registry = AdapterRegistry(adapter_dir, base_id=base.source.served_id, base_fingerprint=base.source.fingerprint)
    registry.scan()
    swaps = {"host": [], "disk": []}
    residency = AdapterResidency(
        registry,
        base.model,
        1,
        max_host=len(names),
        on_swap=lambda name, source, seconds: swaps[source].append(seconds),
    )
    picked = names[: args.swaps + 1]
    disk_total = []
    for name in picked:  # first use of each: read from disk (on this thread, loader=None)
        started = time.perf_counter()
        assert residency.ensure(name, busy=set())
        disk_total.append(time.perf_counter() - started)
    for name in picked[1:] + picked[:1]:  # again: every one is in the host tier now
        assert residency.ensure(name, busy=set())
    # The first swap builds the slot (a PEFT wrap): it is not a swap into an existing slot.
    host, copy = swaps["host"], swaps["disk"][1:]
    return {
        "host_p50_ms": 1000 * statistics.median(host),
        "host_p90_ms": 1000 * pct(host, 90),
        "disk_p50_ms": 1000 * statistics.median(disk_total[1:]),
        "disk_p90_ms": 1000 * pct(disk_total[1:], 90),
        "disk_copy_p50_ms": 1000 * statistics.median(copy),
        "first_slot_build_ms": 1000 * disk_total[0],
        "rank": 16,
    }


# --- 2. the Zipf fleet -------------------------------------------------------------------------


def zipf_draws(names: list[str], exponent: float, count: int, seed: int = 0) -> list[str]:
    weights = [1.0 / (k**exponent) for k in range(1, len(names) + 1)]
    return random.Random(seed).choices(names, weights=weights, k=count)


async def fleet_clients(url: str, prompts, plan: list[list[str]], new_tokens: int) -> dict:
    import httpx

    ttft, tokens, failed = [], 0, 0

    async def client(http, queue: list[str], prompt) -> None:
        nonlocal tokens, failed
        for adapter in queue:
            body = {
                "model": adapter,
                "prompt": prompt,
                "max_tokens": new_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            sent = time.perf_counter()
            first = None
            try:
                async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        failed += 1
                        continue
                    async for line in response.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            failed += 1
                        if chunk.get("choices") and first is None:
                            first = time.perf_counter()
                        if chunk.get("usage"):
                            tokens += chunk["usage"]["completion_tokens"]
            except httpx.HTTPError:
                failed += 1
                continue
            if first is not None:
                ttft.append(first - sent)

    limits = httpx.Limits(max_connections=len(plan) + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http, q, p) for q, p in zip(plan, prompts, strict=True)))
        seconds = time.perf_counter() - started
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "failed": failed,
        "requests": sum(len(q) for q in plan),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
    }


def run_service(args, adapter_dir: Path, env: dict, work) -> dict:
    port = free_port()
    started = time.perf_counter()
    service = start_service(args, adapter_dir, port, args.clients, env=env)
    start_seconds = time.perf_counter() - started
    try:
        result = work(f"http://127.0.0.1:{port}")
        result["start_s"] = start_seconds
        import httpx

        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        result["swaps"] = metric_sum(metrics, "hotswap_adapter_swaps_total")
        result["evictions"] = metric_sum(metrics, "hotswap_adapter_evictions_total")
        return result
    finally:
        service.terminate()
        service.wait(60)


def zipf_runs(args, adapter_dir: Path, names: list[str], tokenizer) -> dict:
    prompts = make_prompts(tokenizer, args.clients, args.prompt_tokens)
    draws = zipf_draws(names, args.zipf, args.clients * args.requests)
    plan = [draws[i :: args.clients] for i in range(args.clients)]

    def work(url):
        asyncio.run(fleet_clients(url, prompts[:1], [[names[0]]], 2))  # warm-up
        return asyncio.run(fleet_clients(url, prompts, plan, args.new_tokens))

    tiered = run_service(
        args,
        adapter_dir,
        {"HOTSWAP_MAX_RESIDENT_ADAPTERS": str(args.slots), "HOTSWAP_MAX_CPU_ADAPTERS": str(args.host_slots)},
        work,
    )
    resident = run_service(
        args,
        adapter_dir,
        {
            "HOTSWAP_MAX_RESIDENT_ADAPTERS": str(len(names)),
            "HOTSWAP_PRELOAD_ADAPTERS": ",".join(names),
        },
        work,
    )
    return {
        "tiered": tiered,
        "all_resident": resident,
        "ratio": tiered["tok_s"] / resident["tok_s"],
        "distinct_adapters": len(set(draws)),
    }


# --- 3. reload under load ----------------------------------------------------------------------


def reload_run(args, adapter_dir: Path, names: list[str], tokenizer) -> dict:
    """Two versions of "live" (bench-0's and bench-1's weights) swapped under streaming load."""
    shelf = Path(tempfile.mkdtemp(prefix="hotswap-shelf-"))
    for version, source in (("v1", names[0]), ("v2", names[1])):
        shutil.copytree(adapter_dir / source, shelf / version)
        manifest = json.loads((shelf / version / "hotswap.json").read_text())
        (shelf / version / "hotswap.json").write_text(json.dumps({**manifest, "name": "live"}))
    prompt = make_prompts(tokenizer, 1, args.prompt_tokens)[0]

    def work(url):
        import httpx

        headers = {"Authorization": f"Bearer {ADMIN}"}

        def load(version, inplace):
            body = {"lora_name": "live", "lora_path": str(shelf / version), "load_inplace": inplace}
            r = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=headers, timeout=120)
            r.raise_for_status()

        async def text_of() -> str | None:
            body = {"model": "live", "prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0}
            body |= {"ignore_eos": True, "stream": True}
            parts = []
            async with httpx.AsyncClient(timeout=600) as http:
                async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        return None
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                return None
                            parts.append(chunk["choices"][0]["text"])
            return "".join(parts)

        load("v1", False)
        v1 = asyncio.run(text_of())
        load("v2", True)
        v2 = asyncio.run(text_of())
        load("v1", True)

        async def under_load():
            stop = asyncio.Event()
            texts: list[str | None] = []

            async def client():
                while not stop.is_set():
                    texts.append(await text_of())

            tasks = [asyncio.create_task(client()) for _ in range(args.clients)]
            for i in range(args.reloads):
                # Reload once a few responses have ended since the last one, so that every
                # version serves requests that start under it while others still run on the
                # version before.
                seen = len(texts)
                while len(texts) < seen + max(1, args.clients // 4):
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(load, "v2" if i % 2 == 0 else "v1", True)
            stop.set()
            await asyncio.gather(*tasks)
            return texts

        texts = asyncio.run(under_load())
        return {
            "versions_differ": v1 != v2,
            "responses": len(texts),
            "failed": sum(t is None for t in texts),
            "mixed": sum(t is not None and t not in (v1, v2) for t in texts),
            "old": sum(t == v1 for t in texts),
            "new": sum(t == v2 for t in texts),
            "reloads": args.reloads,
        }

    env = {"HOTSWAP_ADMIN_API_KEYS": ADMIN, "HOTSWAP_ADAPTER_SOURCES": str(shelf)}
    try:
        return run_service(args, adapter_dir, env, work)
    finally:
        shutil.rmtree(shelf, ignore_errors=True)


# --- driver ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    from service.base_model import load_base

    base = load_base(args.model, quantization=args.quantization, device=args.device, cache_dir=args.cache_dir)
    adapter_dir = Path(tempfile.mkdtemp(prefix="hotswap-fleet-"))
    started = time.perf_counter()
    names = make_adapters(base.source, adapter_dir, args.adapters)
    print(f"{len(names)} rank-16 adapters made in {time.perf_counter() - started:.0f} s", flush=True)
    tokenizer = base.tokenizer
    del base
    results: dict = {"model": args.model, "quantization": args.quantization, "adapters": len(names)}
    try:
        if "swap" not in skip:
            results["swap"] = swap_latency(args, adapter_dir, names)
            print("swap-in:", json.dumps(results["swap"]), flush=True)
        if "zipf" not in skip:
            results["zipf"] = zipf_runs(args, adapter_dir, names, tokenizer)
            z = results["zipf"]
            print(
                f"Zipf({args.zipf}) over {len(names)} adapters ({z['distinct_adapters']} drawn), "
                f"{args.clients} clients: {args.slots} slots + {args.host_slots} host = "
                f"{z['tiered']['tok_s']:.1f} tok/s, all resident = {z['all_resident']['tok_s']:.1f} tok/s, "
                f"ratio {z['ratio']:.1%}; failed {z['tiered']['failed']} / {z['all_resident']['failed']}; "
                f"TTFT p99 {z['tiered']['ttft_p99_s']:.2f} s / {z['all_resident']['ttft_p99_s']:.2f} s",
                flush=True,
            )
        if "reload" not in skip:
            results["reload"] = reload_run(args, adapter_dir, names, tokenizer)
            print("reload under load:", json.dumps(results["reload"]), flush=True)
    finally:
        shutil.rmtree(adapter_dir, ignore_errors=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
