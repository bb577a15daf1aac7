"""Tool calls and structured outputs within budget on the embedded model, over HTTP (issue #31).

    .venv/bin/python -m bench.tools [--requests 60] [--clients 16] [--tokens 48]

Starts the service (SmolLM2, nf4, as `make serve`) and measures, in one run:

1. **Validity**: varied requests (tools required, named and auto; five schemas' `response_format`
   with budgets from tight to loose) on the base, dolly and schema, at temperature 0 and 0.8.
   Prints the rate of tool calls that parse and validate against their function's schema, of
   `response_format` answers that parse and validate where the budget holds the shortest
   completion, and how many ended "length".
2. **Throughput**: `--clients` concurrent chat requests, plain, then with tools, the same
   prompts and budget, in alternating rounds; prints tokens/s of each and the median ratio
   (target >= 0.85). The prompts are the same tokens: plain chat gets the tools' instructions
   as the system message that the generic format writes, without `tools`, so the ratio is the
   grammar's cost (masks, closing) and not a longer prompt's.

Numbers are validated with decimals: `multipleOf: 0.01` fails 19.99 in binary floating point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from decimal import Decimal
from pathlib import Path

import jsonschema

from bench.common import free_port, start_service
from bench.structured_base import SCHEMAS as RESPONSE_SCHEMAS
from service.protocol import ChatTool
from service.serving.tools import GENERIC, instructions

BASE = "smollm2-135m-instruct"
S = {"type": "string", "maxLength": 40}
FUNCTIONS = {
    "get_weather": {
        "type": "object",
        "properties": {
            "city": S,
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
        },
        "required": ["city", "unit"],
    },
    "book_table": {
        "type": "object",
        "properties": {
            "restaurant": S,
            "people": {"type": "integer", "minimum": 1, "maximum": 20},
            "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
            "notes": {"type": "array", "items": S, "maxItems": 3},
        },
        "required": ["restaurant", "people", "time"],
    },
    "search": {
        "type": "object",
        "properties": {"query": S, "limit": {"type": "integer", "maximum": 50}},
        "required": ["query"],
    },
    "send_email": {
        "type": "object",
        "properties": {"to": S, "subject": S, "body": {"type": "string"}, "cc": {"type": "array", "items": S}},
        "required": ["to", "subject", "body"],
    },
}
TOOLS = [{"type": "function", "function": {"name": name, "parameters": schema}} for name, schema in FUNCTIONS.items()]
ASKS = [
    "What is the weather in Lisbon this week?",
    "Book a table for four at Chez Marie at 19:30.",
    "Find recent papers about LoRA adapters.",
    "Email Sam that the launch moved to Friday.",
    "Is it going to rain in Oslo tomorrow, in fahrenheit?",
    "Reserve dinner for two at Sushi Go, 20:00, window seat.",
]
# The system message the generic format writes for TOOLS under `required` (plain chat's prompt).
INSTRUCTIONS = instructions(GENERIC, [ChatTool.model_validate(t) for t in TOOLS], "required")
PRODUCT = json.dumps({"product": "Trail Mug", "description": "A steel mug for hikers"})


def messages_for(model: str, ask: str) -> list[dict]:
    return [{"role": "user", "content": PRODUCT if model == "schema" else ask}]


async def validity(url: str, requests: int) -> dict:
    import httpx

    cases = []
    models = [BASE, "dolly", "schema"]
    choices = ["required", "auto", *[{"type": "function", "function": {"name": n}} for n in FUNCTIONS]]
    for i in range(requests):
        model, ask, temperature = models[i % 3], ASKS[i % len(ASKS)], (0.0, 0.8)[i // 3 % 2]
        body = {"model": model, "messages": messages_for(model, ask), "temperature": temperature, "seed": i}
        cases.append(("tools", {**body, "tools": TOOLS, "tool_choice": choices[i % len(choices)], "max_tokens": 96}))
        name = list(RESPONSE_SCHEMAS)[i % len(RESPONSE_SCHEMAS)]
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": RESPONSE_SCHEMAS[name]}}
        cases.append(
            ("json", {**body, "response_format": fmt, "max_tokens": (40, 64, 128, 256)[i % 4], "_schema": name})
        )
    counts = {"calls": 0, "calls_valid": 0, "text_answers": 0, "json": 0, "json_valid": 0, "json_length": 0}
    failures: list[str] = []
    async with httpx.AsyncClient(timeout=600) as client:
        semaphore = asyncio.Semaphore(8)

        async def one(kind: str, body: dict) -> None:
            name = body.pop("_schema", "")
            schema = RESPONSE_SCHEMAS.get(name)
            async with semaphore:
                r = await client.post(f"{url}/v1/chat/completions", json=body)
            r.raise_for_status()
            choice = r.json()["choices"][0]
            if kind == "tools":
                calls = choice["message"].get("tool_calls") or []
                counts["text_answers"] += not calls
                for call in calls:
                    counts["calls"] += 1
                    try:
                        jsonschema.validate(
                            json.loads(call["function"]["arguments"]), FUNCTIONS[call["function"]["name"]]
                        )
                        counts["calls_valid"] += 1
                    except (ValueError, jsonschema.ValidationError) as exc:
                        failures.append(f"{call['function']['name']}: {str(exc).splitlines()[0]}")
                return
            counts["json"] += 1
            if choice["finish_reason"] == "length":
                counts["json_length"] += 1
                return
            try:
                exact = json.loads(json.dumps(schema), parse_float=Decimal)
                jsonschema.validate(json.loads(choice["message"]["content"], parse_float=Decimal), exact)
                counts["json_valid"] += 1
            except (ValueError, jsonschema.ValidationError) as exc:
                failures.append(f"{name}: {str(exc).splitlines()[0]}: {choice['message']['content']!r}")

        await asyncio.gather(*(one(kind, body) for kind, body in cases))
    for failure in failures:
        print("invalid:", failure)
    return counts


async def throughput(url: str, clients: int, tokens: int, tools: bool) -> dict:
    import httpx

    async def one(client, i: int) -> int:
        body = {
            "model": BASE,
            "messages": messages_for(BASE, ASKS[i % len(ASKS)]),
            "temperature": 0.8,
            "seed": i,
            "max_tokens": tokens,
        }
        if tools:
            body.update(tools=TOOLS, tool_choice="required")
        else:
            body["messages"] = [{"role": "system", "content": INSTRUCTIONS}, *body["messages"]]
        r = await client.post(f"{url}/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        await one(client, 0)  # warm: the grammar compiled, the adapters' paths run once
        started = time.perf_counter()
        generated = await asyncio.gather(*(one(client, i) for i in range(clients)))
        seconds = time.perf_counter() - started
    return {"tokens": sum(generated), "seconds": seconds, "tokens_per_s": sum(generated) / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=f"embedded:{BASE}")
    p.add_argument("--quantization", default="nf4")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/hotswap"))
    p.add_argument("--adapter-dir", type=Path, default=Path("adapters"))
    p.add_argument("--requests", type=int, default=60, help="tool requests (and as many response_format ones)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip-validity", action="store_true", help="throughput only")
    args = p.parse_args(argv)
    port = free_port()
    proc = start_service(args, args.adapter_dir, port, max_batch=args.clients)
    url = f"http://127.0.0.1:{port}"
    try:
        counts = asyncio.run(validity(url, 0 if args.skip_validity else args.requests))
        runs = [
            (
                asyncio.run(throughput(url, args.clients, args.tokens, tools=False)),
                asyncio.run(throughput(url, args.clients, args.tokens, tools=True)),
            )
            for _ in range(args.rounds)
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    calls_rate = counts["calls_valid"] / max(counts["calls"], 1)
    held = counts["json"] - counts["json_length"]
    json_rate = counts["json_valid"] / max(held, 1)
    ratios = [tooled["tokens_per_s"] / plain["tokens_per_s"] for plain, tooled in runs]
    ratio = statistics.median(ratios)
    plain, tooled = runs[-1]
    print(f"tool calls valid:        {counts['calls_valid']}/{counts['calls']} = {calls_rate:.1%}")
    print(f"  answered in text (auto): {counts['text_answers']}")
    print(
        f"response_format valid:   {counts['json_valid']}/{held} = {json_rate:.1%} "
        f"(ended length: {counts['json_length']})"
    )
    print(f"plain chat:              {plain['tokens_per_s']:.1f} tok/s ({plain['tokens']} tokens)")
    print(f"chat with tools:         {tooled['tokens_per_s']:.1f} tok/s ({tooled['tokens']} tokens)")
    print(f"ratio tools / plain:     {ratio:.2f} median of {[round(r, 2) for r in ratios]} (target >= 0.85)")
    print(json.dumps({"counts": counts, "runs": runs, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
