"""`python -m bench.prefix`: time to first token with and without prefix reuse (issue #22).

Starts the service twice on the shipped adapters, with `PREFIX_CACHE_MB=0` and with the
default, one after the other, and sends the same requests to each, one at a time (TTFT without
queueing: the prefill is what prefix reuse shortens):

- `dolly`: Dolly-15k instructions through the adapter's template (`input`);
- `schema`: the MarketMail products of data/schema/unseen.jsonl (`input`);
- `system`: chat on the base with one shared system prompt of about 300 tokens (a few-shot
  block, as applications send), each request its own question.

Prints TTFT p50 per scenario for both services and the reduction. The first request of each
scenario warms the cache (and is left out of both services' figures). With --clients N, N
clients send at once, --requests times: TTFT then also waits for the
steps that carry the other clients' prompts, which prefix reuse shortens too (the requests go
in bursts of N, the next when the last has finished, so that the figure does not depend on how
a closed loop of clients happens to fall into waves: that varied by ±50% between runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from itertools import cycle, islice
from pathlib import Path

from bench.common import free_port, metric_sum, start_service
from service.settings import DEFAULT_MODEL

SYSTEM = (
    "You are the support assistant of Northwind Outdoor, a shop for hiking, camping and paddling "
    "gear. Answer in two or three sentences, politely, and only about our products and policies. "
    "Policies: orders over 50 euros ship free within the EU; returns are accepted within 30 days "
    "in the original packaging; repairs of tents and backpacks are free for two years; gift cards "
    "never expire. Products: the Lakeside canoe paddle (carbon, 480 g), the Granite Peak trekking "
    "poles (aluminium, cork handles), the Summit 2 tent (two people, 1.9 kg, four seasons), the "
    "Ridge 45 backpack (45 litres, rain cover included), the Ember stove (gas, 88 g), the Cedar "
    "sleeping bag (down, comfort to -5 C). Examples of good answers: 'The Summit 2 weighs 1.9 kg "
    "and sleeps two.' 'Yes, returns are free within 30 days if the item is in its original "
    "packaging.' 'Shipping is free within the EU on orders over 50 euros.' Never invent products, "
    "prices or policies; if you do not know, say so and offer to pass the question to a person."
)
QUESTIONS = [
    "How heavy is the Summit 2 tent?",
    "Can I return a stove I used once?",
    "Do you ship to Norway for free?",
    "Is the Ridge 45 waterproof?",
    "What is the comfort temperature of the Cedar bag?",
    "Do gift cards expire?",
    "Which paddle do you sell?",
    "Are tent repairs free?",
    "What stove is the lightest?",
    "Can two people sleep in the Summit 2?",
    "Do the trekking poles fold?",
    "How long do I have to return an item?",
]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.prefix", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--quantization", default="nf4")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", type=Path, default=Path("~/.cache/hotswap").expanduser())
    p.add_argument("--adapter-dir", type=Path, default=Path("adapters"))
    p.add_argument("--dolly", type=Path, default=Path("../shared/data/dolly/databricks-dolly-15k.jsonl"))
    p.add_argument("--requests", type=int, default=12, help="per scenario (plus one warm-up)")
    p.add_argument(
        "--clients",
        type=int,
        default=1,
        help="requests sent at once, in --requests bursts; with more than one, TTFT includes the "
        "other prompts of the burst, carried in the same steps",
    )
    return p


def scenarios(args) -> dict[str, list[tuple[str, dict]]]:
    n = args.requests * args.clients + 1
    dolly = []
    with args.dolly.open() as handle:
        for line in handle:
            row = json.loads(line)
            if not row["context"] and len(row["instruction"]) < 200:
                dolly.append(row["instruction"])
            if len(dolly) >= n:
                break
    products = [json.loads(line) for line in Path("data/schema/unseen.jsonl").read_text().splitlines()]
    products = list(islice(cycle(products), n))
    if args.clients > 1:  # each client its own product: the same product twice is a longer shared prefix
        products = [{**p, "product": f"{p['product']} ({i})"} for i, p in enumerate(products)]
    return {
        "dolly": [("/v1/completions", {"model": "dolly", "input": {"instruction": d}}) for d in dolly[:n]],
        "schema": [("/v1/completions", {"model": "schema", "input": p}) for p in products[:n]],
        "system": [
            (
                "/v1/chat/completions",
                {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]},
            )
            for q in islice(cycle(QUESTIONS), n)
        ],
    }


def ttft(url: str, path: str, body: dict, base_id: str) -> tuple[float, int]:
    import httpx

    body = {"model": base_id, **body, "max_tokens": 4, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    sent, first, prompt_tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    return first - sent, prompt_tokens


def clients(url: str, requests: list[tuple[str, dict]], base_id: str, count: int) -> list[tuple[float, int]]:
    """(TTFT, prompt tokens) of every request, sent in bursts of `count` at once (the next burst
    when the last has finished)."""
    from concurrent.futures import ThreadPoolExecutor

    out = []
    with ThreadPoolExecutor(count) as pool:
        for start in range(0, len(requests), count):
            burst = requests[start : start + count]
            out += pool.map(lambda request: ttft(url, *request, base_id), burst)
    return out


def measure(args, prefix_mb: int, plan) -> dict:
    import httpx

    port = free_port()
    args.cache_dir = args.cache_dir.expanduser()
    service = start_service(args, args.adapter_dir, port, 16, env={"HOTSWAP_PREFIX_CACHE_MB": str(prefix_mb)})
    url = f"http://127.0.0.1:{port}"
    try:
        base_id = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        out = {}
        for name, requests in plan.items():
            ttft(url, *requests[0], base_id)  # warms the scenario's prefix (left out)
            times = clients(url, requests[1:], base_id, args.clients)
            out[name] = {
                "ttft_p50_ms": 1000 * statistics.median(t for t, _ in times),
                "prompt_tokens_p50": statistics.median(n for _, n in times),
            }
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        out["reused_tokens"] = metric_sum(metrics, "hotswap_prefix_cache_reused_tokens_total")
        return out
    finally:
        service.terminate()
        service.wait(60)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    plan = scenarios(args)
    without = measure(args, 0, plan)
    with_reuse = measure(args, 256, plan)
    at_once = "one at a time" if args.clients == 1 else f"{args.clients} clients at once"
    print(f"\n{args.model} {args.quantization}; TTFT p50 of {args.requests * args.clients} requests, {at_once}\n")
    print("| scenario | prompt tokens p50 | without reuse | with reuse | reduction |")
    print("|---|---:|---:|---:|---:|")
    for name in plan:
        a, b = without[name]["ttft_p50_ms"], with_reuse[name]["ttft_p50_ms"]
        tokens = without[name]["prompt_tokens_p50"]
        print(f"| {name} | {tokens:.0f} | {a:.0f} ms | {b:.0f} ms | {1 - b / a:.0%} |")
    print(f"\nprompt tokens served from the prefix cache: {with_reuse['reused_tokens']:.0f}")
    print(json.dumps({"without": without, "with": with_reuse}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
