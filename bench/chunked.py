"""`python -m bench.chunked`: inter-token latency of running streams while long prompts join.

--clients streaming clients generate --new-tokens each (64-token prompts, mixed adapters);
once they run, --joiners requests with --long-tokens prompts arrive one after another (each
generating 4 tokens). The same scenario runs against up to four services (--runs), one after the other:
- whole: the prefill budget per step (MAX_PREFILL_TOKENS) is larger than the long prompts, so
  each joins in one prefill pass of its own, which every running stream waits for
  (PACKED_STEPS=false);
- separate: --budget, prompts longer than it prefilled in chunks, each in a forward pass of
  its own between decode steps (PACKED_STEPS=false);
- packed: --budget, every prompt (a long one a chunk at a time) inside the decode step's
  forward pass (PACKED_STEPS=true, the default; service/engine/packed.py);
- timed: packed, with no token budget but the default's time bound: beside running streams a
  step carries the prompt tokens that keep it within --slowdown plain decode steps
  (PREFILL_STEP_SLOWDOWN, service/engine/budget.py), as `make serve` runs.
The first three set PREFILL_STEP_SLOWDOWN=0 (the token budget alone).
With --long-tokens no larger than --budget, the joiners are short prompts arriving one by one:
separate then prefills each in a pass of its own, packed carries it in a decode step.
Prints the running streams' ITL p50 and p99 and their ratio for each, and the joiners' TTFT;
then each run's p99 over the whole run's p50 (a decode step with no join in it): with small
chunks most steps carry one, and the p50 itself rises.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from bench.common import (
    add_model_args,
    free_port,
    load_with_adapters,
    make_prompts,
    pct,
    start_service,
)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.chunked", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--joiners", type=int, default=3)
    p.add_argument("--long-tokens", type=int, default=1000)
    p.add_argument("--budget", type=int, default=32, help="MAX_PREFILL_TOKENS of the chunked runs")
    p.add_argument("--slowdown", type=float, default=1.75, help="PREFILL_STEP_SLOWDOWN of the timed run")
    p.add_argument("--runs", default="whole,separate,packed,timed", help="which runs (whole is always one)")
    return p


async def scenario(url: str, short, long, adapters, args) -> dict:
    import httpx

    gaps, joiner_ttft = [], []
    running = asyncio.Event()

    async def stream(http, prompt, adapter, tokens, record: bool) -> float:
        body = {"model": adapter, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
        body |= {"ignore_eos": True, "stream": True}
        sent, last, first = time.perf_counter(), None, None
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                first = first or now
                if record and last is not None:
                    gaps.append(now - last)
                last = now
                running.set()
        return first - sent

    async def joiners(http):
        await running.wait()
        await asyncio.sleep(1.0)
        for prompt in long:
            joiner_ttft.append(await stream(http, prompt, adapters[0], 4, record=False))

    async with httpx.AsyncClient(timeout=3600) as http:
        streams = [
            stream(http, p, adapters[i % len(adapters)], args.new_tokens, record=True) for i, p in enumerate(short)
        ]
        await asyncio.gather(*streams, joiners(http))
    return {
        "itl_p50_ms": 1000 * pct(gaps, 50),
        "itl_p99_ms": 1000 * pct(gaps, 99),
        "itl_max_ms": 1000 * max(gaps),
        "p99_over_p50": pct(gaps, 99) / pct(gaps, 50),
        "joiner_ttft_s": sum(joiner_ttft) / len(joiner_ttft),
    }


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    args.adapters = max(args.adapters, 2)
    base, _, names, adapter_dir = load_with_adapters(args)
    short = make_prompts(base.tokenizer, args.clients, 64)
    long = [p[: args.long_tokens] for p in make_prompts(base.tokenizer, args.joiners, args.long_tokens + 8)]
    del base
    results = {}
    cap = max(4096, args.long_tokens + 1)
    runs = (  # label, MAX_PREFILL_TOKENS, PACKED_STEPS, PREFILL_STEP_SLOWDOWN
        ("whole", cap, "false", "0"),
        ("separate", args.budget, "false", "0"),
        ("packed", args.budget, "true", "0"),
        ("timed", cap, "true", str(args.slowdown)),
    )
    chosen = set(args.runs.split(",")) | {"whole"}  # whole's p50 is the calm pace below
    for label, budget, packed, slowdown in [run for run in runs if run[0] in chosen]:
        port = free_port()
        env = {
            "HOTSWAP_MAX_PREFILL_TOKENS": str(budget),
            "HOTSWAP_PREFIX_CACHE_MB": "0",
            "HOTSWAP_PACKED_STEPS": packed,
            "HOTSWAP_PREFILL_STEP_SLOWDOWN": slowdown,
        }
        service = start_service(args, adapter_dir, port, args.clients + args.joiners, env=env)
        try:
            results[label] = asyncio.run(scenario(f"http://127.0.0.1:{port}", short, long, names, args))
            results[label]["budget"] = budget
        finally:
            service.terminate()
            service.wait(60)
        r = results[label]
        print(
            f"{label:8s} MAX_PREFILL_TOKENS={budget} PACKED_STEPS={packed} PREFILL_STEP_SLOWDOWN={slowdown}: "
            f"running streams ITL p50 {r['itl_p50_ms']:.0f} ms, "
            f"p99 {r['itl_p99_ms']:.0f} ms (x{r['p99_over_p50']:.2f}), max {r['itl_max_ms']:.0f} ms; "
            f"{args.long_tokens}-token joiners' TTFT {r['joiner_ttft_s']:.2f} s",
            flush=True,
        )
    calm = results["whole"]["itl_p50_ms"]  # the streams' pace between joins: a decode step alone
    for label, r in results.items():
        r["p99_over_calm_p50"] = r["itl_p99_ms"] / calm
        ratio = r["p99_over_calm_p50"]
        print(f"{label:8s} ITL p99 / the whole run's p50 ({calm:.0f} ms, a step with no join): x{ratio:.2f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
