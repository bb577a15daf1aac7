"""`python -m bench.throughput`: one base, mixed adapters, three ways to serve the same requests.

(a) the seed's path: per request `set_adapter` then `generate`, one after another;
(b) one static `generate(adapter_names=...)` batch of all requests;
(c) the running service over HTTP, N concurrent streaming clients.

Every request has the same prompt length and generates exactly --new-tokens tokens (EOS is
suppressed), spread round-robin over the base and --adapters random LoRA adapters made on the
spot for the loaded base. Prints a table and a JSON line; --sweep adds a plot of aggregate tok/s
and p99 time to first token against concurrent clients.

--json-schema FILE runs (c) a second time with that schema as every request's response_format
(bench/schemas/long_text.json never completes within the budget, so both runs generate the same
tokens) and prints the ratio of the two, then the time to first token of a request with a
schema the server has not compiled yet against one it has.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from bench.common import (
    add_model_args,
    free_port,
    load_with_adapters,
    make_prompts,
    pct,
    service_clients,
    start_service,
)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--sweep", default="", help="comma-separated client counts, e.g. 1,2,4,8,16,32")
    p.add_argument("--plot", type=Path, help="PNG for the sweep (default docs/benchmark-<device>.png)")
    p.add_argument(
        "--guardrails",
        help="also run (c) on a second service started with this guardrails "
        "config ('default': what make serve runs) and print its ratio to the first (none)",
    )
    p.add_argument(
        "--json-schema", type=Path, help="also run (c) with this JSON schema as response_format on every request"
    )
    p.add_argument(
        "--seed-requests",
        type=int,
        default=0,
        help="run (a) once, on this many requests, for every client count (its rate does "
        "not depend on the count: it serves one request at a time); 0: all of them, per count",
    )
    return p


# --- set-up ------------------------------------------------------------------------------------


# --- the three paths ---------------------------------------------------------------------------


def seed_path(model, prompts, adapters, new_tokens, device) -> dict:
    """The workshop's serving loop: switch the active adapter, then generate, per request."""
    import torch

    started, tokens = time.perf_counter(), 0
    for ids, adapter in zip(prompts, adapters, strict=True):
        ctx = model.disable_adapter() if adapter is None else torch.no_grad()
        if adapter is not None:
            model.set_adapter(adapter)
        with ctx, torch.no_grad():
            batch = torch.tensor([ids], device=device)
            out = model.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
        tokens += out.shape[1] - len(ids)
    return {"tokens": tokens, "seconds": time.perf_counter() - started, "requests": len(prompts)}


def static_batch(model, prompts, adapters, new_tokens, device) -> dict:
    import torch

    started = time.perf_counter()
    kwargs = {"adapter_names": [a or "__base__" for a in adapters]} if hasattr(model, "peft_config") else {}
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            **kwargs,
        )
    tokens = (out.shape[1] - len(prompts[0])) * len(prompts)
    return {"tokens": tokens, "seconds": time.perf_counter() - started}


# --- driver ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    base, model, names, adapter_dir = load_with_adapters(args)
    counts = sorted({args.clients, *(int(c) for c in args.sweep.split(",") if c)})
    cycle = [None, *names]
    port = free_port()
    service = start_service(args, adapter_dir, port, max(counts))
    rows, seed = [], None
    try:
        for n in counts:
            prompts = make_prompts(base.tokenizer, n, args.prompt_tokens)
            adapters = [cycle[i % len(cycle)] for i in range(n)]
            static_batch(model, prompts[:1], adapters[:1], 2, base.device)  # warm-up
            if args.seed_requests:  # the same first requests for every count: measured once
                if seed is None:
                    k = args.seed_requests
                    seed = seed_path(
                        model,
                        make_prompts(base.tokenizer, k, args.prompt_tokens),
                        [cycle[i % len(cycle)] for i in range(k)],
                        args.new_tokens,
                        base.device,
                    )
                a = seed
            else:
                a = seed_path(model, prompts, adapters, args.new_tokens, base.device)
            b = static_batch(model, prompts, adapters, args.new_tokens, base.device)
            url = f"http://127.0.0.1:{port}"
            # Warm-up, one request per adapter: (a) and (b) run on adapters loaded beforehand, so
            # (c) must not time the service's lazy first load of each adapter.
            warm = make_prompts(base.tokenizer, len(cycle), args.prompt_tokens)
            asyncio.run(service_clients(url, base.source.served_id, warm, cycle, 2))
            c = asyncio.run(service_clients(url, base.source.served_id, prompts, adapters, args.new_tokens))
            rows.append(summarise(n, a, b, c))
            if args.json_schema:
                rows[-1].update(grammar_runs(args, url, base, prompts, adapters, c))
    finally:
        service.terminate()
        service.wait(timeout=60)
    if args.guardrails:
        guarded_runs(args, base, adapter_dir, cycle, rows)
    report(args, base, rows)
    return 0


def guarded_runs(args, base, adapter_dir, cycle, rows) -> None:
    """(c) again on a service with guardrails, after the first (none) has stopped: same prompts."""
    port = free_port()
    service = start_service(args, adapter_dir, port, max(r["clients"] for r in rows), args.guardrails)
    try:
        url = f"http://127.0.0.1:{port}"
        warm = make_prompts(base.tokenizer, len(cycle), args.prompt_tokens)
        asyncio.run(service_clients(url, base.source.served_id, warm, cycle, 2))
        for row in rows:
            n = row["clients"]
            prompts = make_prompts(base.tokenizer, n, args.prompt_tokens)
            adapters = [cycle[i % len(cycle)] for i in range(n)]
            g = asyncio.run(service_clients(url, base.source.served_id, prompts, adapters, args.new_tokens))
            row["guarded_tok_s"] = g["tokens"] / g["seconds"]
            row["guarded_over_none"] = row["guarded_tok_s"] / row["service_tok_s"]
            row["guarded_over_seed"] = row["guarded_tok_s"] / row["seed_tok_s"]
    finally:
        service.terminate()
        service.wait(timeout=60)


def grammar_runs(args, url, base, prompts, adapters, free) -> dict:
    """(c) again with a response_format on every request, and the TTFT of compiling a schema."""
    schema = json.loads(args.json_schema.read_text())

    def fmt(s):
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "bench", "schema": s}}}

    model_id = base.source.served_id
    asyncio.run(service_clients(url, model_id, prompts[:1], adapters[:1], 2, fmt(schema)))  # compiled once
    g = asyncio.run(service_clients(url, model_id, prompts, adapters, args.new_tokens, fmt(schema)))
    new, cached = [], []
    for i in range(8):  # one at a time: a fresh schema (a title the cache has not seen), then it again
        fresh = {**schema, "title": f"bench-{time.time_ns()}-{i}"}
        new.append(asyncio.run(service_clients(url, model_id, prompts[:1], adapters[:1], 2, fmt(fresh)))["ttft_p50"])
        cached.append(asyncio.run(service_clients(url, model_id, prompts[:1], adapters[:1], 2, fmt(fresh)))["ttft_p50"])
    rate = g["tokens"] / g["seconds"]
    return {
        "grammar_tok_s": rate,
        "grammar_over_free": rate / (free["tokens"] / free["seconds"]),
        "grammar_tokens": g["tokens"],
        "free_tokens": free["tokens"],
        "ttft_new_schema_p50_s": pct(new, 50),
        "ttft_cached_schema_p50_s": pct(cached, 50),
    }


def summarise(n, a, b, c) -> dict:
    rate = lambda r: r["tokens"] / r["seconds"] if r else float("nan")  # noqa: E731
    row = {
        "clients": n,
        "seed_tok_s": rate(a),
        "static_tok_s": rate(b),
        "service_tok_s": rate(c),
        "ttft_p50_s": c["ttft_p50"],
        "ttft_p99_s": c["ttft_p99"],
        "itl_p50_s": c["itl_p50"],
        "itl_p99_s": c["itl_p99"],
    }
    row["c_over_a"] = row["service_tok_s"] / row["seed_tok_s"]
    row["c_over_b"] = row["service_tok_s"] / row["static_tok_s"]
    # (a) and (b) run whole requests at once: their TTFT is their full latency.
    # (a) serves one request after another: the last of n waits for the n - 1 before it.
    per_request = a["seconds"] / a["requests"]
    row["seed_ttft_p99_s"] = per_request * (n - 1) + per_request * a["requests"] / a["tokens"]
    row["static_ttft_p99_s"] = b["seconds"]
    return row


def report(args, base, rows) -> None:
    import torch

    device = torch.cuda.get_device_name() if base.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(
        f"\n{args.model} {args.quantization} on {device}; {args.prompt_tokens} prompt + "
        f"{args.new_tokens} new tokens per request; base + {args.adapters} adapters round-robin"
    )
    header = (
        f"{'clients':>7} {'(a) seed':>10} {'(b) static':>10} {'(c) http':>10} {'c/a':>6} {'c/b':>6} "
        f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['clients']:>7} {r['seed_tok_s']:>10.1f} {r['static_tok_s']:>10.1f} {r['service_tok_s']:>10.1f} "
            f"{r['c_over_a']:>6.2f} {r['c_over_b']:>6.2f} {r['ttft_p50_s']:>9.3f} {r['ttft_p99_s']:>9.3f} "
            f"{r['itl_p50_s']:>8.4f} {r['itl_p99_s']:>8.4f}"
        )
    for r in rows:
        if "guarded_tok_s" in r:
            print(
                f"{r['clients']:>7} clients, guardrails {args.guardrails}: {r['guarded_tok_s']:.1f} tok/s, "
                f"{r['guarded_over_none']:.1%} of none, {r['guarded_over_seed']:.2f}x the seed path"
            )
        if "grammar_tok_s" in r:
            print(
                f"{r['clients']:>7} clients, every request under {args.json_schema}: {r['grammar_tok_s']:.1f} tok/s, "
                f"{r['grammar_over_free']:.1%} of the same run without ({r['grammar_tokens']} and "
                f"{r['free_tokens']} tokens); TTFT p50 of one request: new schema {r['ttft_new_schema_p50_s']:.3f} s, "
                f"cached {r['ttft_cached_schema_p50_s']:.3f} s"
            )
    print(
        json.dumps(
            {
                "model": args.model,
                "quantization": args.quantization,
                "device": device,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                "rows": rows,
            }
        )
    )
    if len(rows) > 1:
        plot(rows, args.plot or Path("docs") / f"benchmark-{base.device}.png", device)


def plot(rows, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["clients"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for key, label in (
        ("seed_tok_s", "(a) seed path"),
        ("static_tok_s", "(b) static batch"),
        ("service_tok_s", "(c) service over HTTP"),
    ):
        left.plot(n, [r[key] for r in rows], "o-", label=label)
    for key, label in (
        ("seed_ttft_p99_s", "(a) seed path (= latency)"),
        ("static_ttft_p99_s", "(b) static batch (= latency)"),
        ("ttft_p99_s", "(c) service"),
    ):
        right.plot(n, [r[key] for r in rows], "o-", label=label)
    left.set(xscale="log", xlabel="concurrent clients", ylabel="aggregate tokens / s", title=f"throughput, {device}")
    right.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent clients",
        ylabel="p99 time to first token (s)",
        title="time to first token",
    )
    for ax in (left, right):
        ax.set_xticks(n, [str(x) for x in n])
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
