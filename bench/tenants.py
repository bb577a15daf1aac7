"""`python -m bench.tenants`: another tenant's time to first token while one tenant floods.

Issue #33's scenario. Tenant A sends one request of --flood-prompts prompts x n --flood-n at
--flood-tokens new tokens each (a flood far larger than the batch); once its rows run, tenant
B asks --probes short streaming requests one after another and the bench reads B's time to
first token. The same runs three ways, each against its own service:

- idle: B alone on the server, its TTFT baseline;
- tenants: A and B as two tenants of TENANTS_FILE (fair shares, scheduler.py `_Shares`);
- shared: A and B with one API key between them (one tenant: FIFO, as before tenants).

--shared-adapter puts both tenants on one adapter (else each has its own). A probe that gets no
first token within --patience seconds counts as that long (the shared run's flood holds every
row for thousands of steps). Prints B's TTFT p50 and max per run and each over the idle p50,
then one JSON line. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from bench.common import add_model_args, free_port, load_with_adapters, make_prompts, start_service

KEY_A = "tenant-a-key-" + "a" * 16
KEY_B = "tenant-b-key-" + "b" * 16


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.tenants", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--flood-prompts", type=int, default=16)
    p.add_argument("--flood-n", type=int, default=16)
    p.add_argument("--flood-tokens", type=int, default=4000)
    p.add_argument("--probes", type=int, default=8, help="B's requests, one after another")
    p.add_argument("--probe-tokens", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--patience", type=float, default=120.0, help="seconds a probe waits for its first token")
    p.add_argument("--shared-adapter", action="store_true", help="both tenants on one adapter")
    p.add_argument("--runs", default="idle,tenants,shared")
    return p


def tenants_file(folder: Path, a_adapter: str, b_adapter: str) -> Path:
    path = folder / "tenants.yaml"
    path.write_text(
        f"tenants:\n"
        f'  a:\n    keys: ["{KEY_A}"]\n    adapters: ["{a_adapter}"]\n'
        f'  b:\n    keys: ["{KEY_B}"]\n    adapters: ["{b_adapter}"]\n'
    )
    return path


async def probe(url: str, key: str, adapter: str, prompt: list[int], tokens: int, patience: float) -> float:
    """One streaming request: seconds to its first token (`patience` if none came by then)."""
    import httpx

    body = {"model": adapter, "prompt": prompt, "max_tokens": tokens, "stream": True, "ignore_eos": True}
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=None, headers={"Authorization": f"Bearer {key}"}) as client:
        try:
            async with asyncio.timeout(patience):
                async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if line.startswith("data: ") and '"text"' in line:
                            return time.perf_counter() - started
        except TimeoutError:
            return patience
    return time.perf_counter() - started


async def scenario(url: str, args, adapters: tuple[str, str], keys: tuple[str, str], prompts) -> list[float]:
    """B's TTFTs while A floods (no flood when keys[0] is None)."""
    import httpx

    flood = None
    if keys[0] is not None:
        body = {
            "model": adapters[0],
            "prompt": prompts[: args.flood_prompts],
            "n": args.flood_n,
            "max_tokens": args.flood_tokens,
            "ignore_eos": True,
        }
        client = httpx.AsyncClient(timeout=None, headers={"Authorization": f"Bearer {keys[0]}"})
        flood = asyncio.create_task(client.post(f"{url}/v1/completions", json=body))
        await wait_running(url, args.max_batch - 1)
    ttfts = []
    for i in range(args.probes):
        prompt = prompts[(i + 1) % len(prompts)]
        ttfts.append(await probe(url, keys[1], adapters[1], prompt, args.probe_tokens, args.patience))
    if flood is not None:
        flood.cancel()  # the client hangs up: the service cancels the flood's sequences
        await asyncio.gather(flood, return_exceptions=True)
        await client.aclose()
    return ttfts


async def wait_running(url: str, rows: int, limit: float = 600.0) -> None:
    """Until the engine runs at least `rows` sequences (the flood has the batch)."""
    import httpx

    deadline = time.monotonic() + limit
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            text = (await client.get(f"{url}/metrics")).text
            running = next((ln for ln in text.splitlines() if ln.startswith("hotswap_running_requests ")), "")
            if running and float(running.split()[1]) >= rows:
                return
            await asyncio.sleep(0.5)
    raise SystemExit("the flood never filled the batch")


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    args.adapters = 1 if args.shared_adapter else 2
    base, _, names, adapter_dir = load_with_adapters(args)
    prompts = make_prompts(base.tokenizer, max(args.flood_prompts, args.probes + 1), 48)
    del base
    adapters = (names[0], names[0] if args.shared_adapter else names[1])
    env = {
        "HOTSWAP_MAX_REQUEST_SEQUENCES": str(args.flood_prompts * args.flood_n),
        "HOTSWAP_MAX_REQUEST_TOKENS": str(args.flood_prompts * args.flood_n * args.flood_tokens),
        "HOTSWAP_MAX_QUEUED_REQUESTS": str(args.flood_prompts * args.flood_n + args.probes),
        "HOTSWAP_PREFIX_CACHE_MB": "0",
    }
    runs = {
        "idle": ({"HOTSWAP_TENANTS_FILE": str(tenants_file(adapter_dir, *adapters))}, (None, KEY_B)),
        "tenants": ({"HOTSWAP_TENANTS_FILE": str(tenants_file(adapter_dir, *adapters))}, (KEY_A, KEY_B)),
        "shared": ({"HOTSWAP_API_KEYS": KEY_A}, (KEY_A, KEY_A)),
    }
    results: dict[str, dict] = {}
    for label in args.runs.split(","):
        extra, keys = runs[label]
        port = free_port()
        service = start_service(args, adapter_dir, port, args.max_batch, env={**env, **extra})
        try:
            ttfts = asyncio.run(scenario(f"http://127.0.0.1:{port}", args, adapters, keys, prompts))
        finally:
            service.terminate()
            service.wait(60)
        results[label] = {"ttft_s": ttfts, "p50_s": statistics.median(ttfts), "max_s": max(ttfts)}
        print(
            f"{label:8s} B's TTFT p50 {results[label]['p50_s']:.3f} s, max {results[label]['max_s']:.3f} s", flush=True
        )
    idle = results.get("idle", {}).get("p50_s")
    for label, r in results.items():
        if idle:
            r["p50_over_idle"], r["max_over_idle"] = r["p50_s"] / idle, r["max_s"] / idle
            print(f"{label:8s} p50 x{r['p50_over_idle']:.1f}, max x{r['max_over_idle']:.1f} of idle p50")
    print(json.dumps({"bench": "tenants", "shared_adapter": args.shared_adapter, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
