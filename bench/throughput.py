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
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The base and its random adapters: options shared with bench.step."""
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--quantization", default="nf4", choices=["nf4", "int8", "bf16", "fp32"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cache-dir", type=Path, default=Path("~/.cache/hotswap").expanduser())
    p.add_argument("--adapters", type=int, default=2, help="random LoRA adapters besides the base")


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
