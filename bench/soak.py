"""Soak: N clients at twice the service's capacity, for a while, on loopback.

    .venv/bin/python -m bench.soak [--model embedded:smollm2-135m-instruct] [--seconds 180]

Starts `python -m service` with a small batch and queue (capacity = batch + queue requests in
the service at once), then runs 2 x capacity clients in a closed loop: each sends a request
(streaming or not, over the base and every adapter), waits for the whole answer, and sends the
next. Every request must either complete (200, a finish reason, `[DONE]` for streams) or be
refused with 429 and Retry-After; anything else counts as lost. Reports outcomes, throughput,
latency and the server's resident memory at the start and the end. Prints a table and a JSON
line; exits 1 if a request was lost or answered 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from service.settings import DEFAULT_MODEL
from tests.support import running_service  # start on a free port, wait for /ready, stop


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


BROKEN: list[str] = []  # the end of the first broken streams, for the report


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, float]:
    """('ok' | 'rejected' | 'lost:<why>', seconds)."""
    started = time.perf_counter()
    try:
        if body.get("stream"):
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                if r.status_code == 429:
                    return ("rejected" if r.headers.get("retry-after") else "lost:429-without-retry-after"), 0.0
                if r.status_code != 200:
                    return f"lost:{r.status_code}", 0.0
                lines = [line async for line in r.aiter_lines() if line]
            finished = any('"finish_reason":"' in line for line in lines)
            ok = lines and lines[-1] == "data: [DONE]" and finished and '"error":{' not in "".join(lines)
            if not ok and len(BROKEN) < 3:
                BROKEN.append(" | ".join(lines[-2:])[-600:])
            return ("ok" if ok else "lost:broken-stream"), time.perf_counter() - started
        r = await client.post(f"{url}/v1/completions", json=body)
        if r.status_code == 429:
            return ("rejected" if r.headers.get("retry-after") else "lost:429-without-retry-after"), 0.0
        if r.status_code != 200:
            return f"lost:{r.status_code}", 0.0
        ok = all(c.get("finish_reason") for c in r.json()["choices"])
        return ("ok" if ok else "lost:no-finish-reason"), time.perf_counter() - started
    except httpx.HTTPError as exc:
        return f"lost:{type(exc).__name__}", 0.0


async def soak(url: str, base_id: str, adapters: list[str], clients: int, seconds: float, max_tokens: int) -> dict:
    targets = [{"model": base_id}] + [{"model": base_id, "adapter": a} for a in adapters]
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    tokens = 0
    stop_at = time.monotonic() + seconds

    async def client_loop(i: int) -> None:
        nonlocal tokens
        async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10)) as client:
            n = 0
            while time.monotonic() < stop_at:
                body = {
                    **targets[(i + n) % len(targets)],
                    "prompt": f"Request {i}.{n}: write a short note.",
                    "max_tokens": max_tokens,
                    "temperature": 0.8,
                    "seed": i * 1000 + n,
                    "ignore_eos": True,
                    "stream": (i + n) % 2 == 0,
                }
                outcome, seconds_taken = await one_request(client, url, body)
                outcomes[outcome] += 1
                if outcome == "ok":
                    latencies.append(seconds_taken)
                    tokens += max_tokens
                elif outcome == "rejected":
                    await asyncio.sleep(1.0)  # a well-behaved client honours Retry-After: 1
                n += 1

    started = time.monotonic()
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    elapsed = time.monotonic() - started
    latencies.sort()
    pick = lambda q: round(latencies[min(int(len(latencies) * q), len(latencies) - 1)], 2) if latencies else None  # noqa: E731
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "outcomes": dict(outcomes),
        "lost": sum(v for k, v in outcomes.items() if k.startswith("lost")),
        "server_errors": sum(v for k, v in outcomes.items() if k.startswith("lost:5")),
        "tokens_per_second": round(tokens / elapsed, 1),
        "latency_p50_s": pick(0.5),
        "latency_p99_s": pick(0.99),
        "broken_samples": list(BROKEN),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--adapter-dir", default="adapters")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queued", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--log", type=Path, default=Path("soak-server.log"))
    args = parser.parse_args()
    capacity = args.max_batch_size + args.max_queued
    flags = [
        "--model",
        args.model,
        "--quantization",
        args.quantization,
        "--device",
        "cpu",
        "--adapter-dir",
        args.adapter_dir,
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-queued-requests",
        str(args.max_queued),
        "--guardrails",
        "default",
    ]
    with running_service(flags, {}, args.log, timeout=600) as (url, proc):
        models = httpx.get(f"{url}/v1/models").json()["data"]
        base_id = models[0]["id"]
        adapters = [m["id"] for m in models[1:]]
        # Warm up (first adapter loads, allocator growth), then measure memory from here.
        asyncio.run(soak(url, base_id, adapters, len(adapters) + 1, 3, args.max_tokens))
        rss_start = rss_mib(proc.pid)
        result = asyncio.run(soak(url, base_id, adapters, 2 * capacity, args.seconds, args.max_tokens))
        rss_end = rss_mib(proc.pid)
    exit_code = proc.returncode
    result.update(
        capacity=capacity,
        model=args.model,
        rss_start_mib=round(rss_start, 1),
        rss_end_mib=round(rss_end, 1),
        rss_growth_mib=round(rss_end - rss_start, 1),
        server_exit_code=exit_code,
        cpus=os.cpu_count(),
    )
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps({"bench": "soak", **result}))
    return 1 if result["lost"] or result["server_errors"] or exit_code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
