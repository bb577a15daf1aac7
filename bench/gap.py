"""`python -m bench.gap`: the service against its own decode step, and what a bigger pool costs.

Issue #22 item 4. For each client count n, on the same n requests (prompt of --prompt-tokens,
exactly --new-tokens generated, round-robin over the base and --adapters random adapters):

- **step alone**: in this process, the n prompts prefilled together, then --new-tokens decode
  steps of all n rows through the engine's own runner and KV cache (no HTTP, no scheduling,
  nobody joining or leaving): n x new tokens / the decode steps' total time. The engine's limit.
  The cache is the service's (--kv-cache, MAX_MODEL_LEN): on a GPU the static one, with every
  bucket captured as a CUDA graph first, as the service does at start.
- **service**: `python -m service` over HTTP, n streaming clients at once:
  generated tokens / wall time, from the first request sent to the last token received. The
  prompts are unique from their first token, so no stored prefix serves them; then the same
  prompts are sent again ("repeated"), which prefix reuse serves from the stored KV.

Where the service's time goes, from the engine's own `hotswap_engine_step_seconds` read before
and after each run: prefill (the prompts, which the step alone leaves out), decode steps (their
mean against the step alone's: the cost of sharing the cores with the HTTP side and the
clients), and the rest of the wall time (the engine waiting for requests to arrive, scheduling
between steps, the last tokens' delivery).

Then **the adapter pool**: the service at --clients again, with only the workload's adapters
resident, and with --pool adapters resident (PRELOAD_ADAPTERS; the others get no request): two
services, used in turn. A batch's rows go through every adapter of the pool (masked per row), so
this is what holding 8 adapters costs against 2 (used in turn, in alternating order). Every
figure is the median of --repeat runs.
Also read from the service: its CUDA-graph capture time at start and the captures under
traffic (issue #22 item 3: none). Prints a table and one JSON line; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any


def make_parser() -> argparse.ArgumentParser:
    from bench.common import add_model_args

    p = argparse.ArgumentParser(prog="python -m bench.gap", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--sweep", default="1,4,16,64", help="comma-separated client counts")
    p.add_argument("--clients", type=int, default=16, help="client count of the pool comparison")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--pool", type=int, default=8, help="adapters resident in the pool run (0: skip it)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the medians are reported")
    p.add_argument(
        "--kv-cache",
        default="auto",
        choices=["auto", "static", "dynamic"],
        help="the service's KV_CACHE, and the step alone's cache: auto is static with CUDA graphs on "
        "a GPU (what the service picks when the reservation fits), dynamic on a CPU",
    )
    p.add_argument(
        "--max-model-len", type=int, default=0, help="MAX_MODEL_LEN (0: prompt + new tokens, rounded up to 64)"
    )
    return p


def step_kv(runner, kind: str, rows: int, max_len: int, slots: int):
    """The KV cache the service's engine runs with: a SlotKV with every (rows, width) bucket
    captured as CUDA graphs now, as the service does at start (static), or a PaddedKV."""
    from service.engine.kvcache import PaddedKV, SlotKV, kv_shape
    from service.engine.runner import hidden_dtype

    if kind == "dynamic":
        return PaddedKV(runner)
    kv = SlotKV(runner, rows, max_len, cuda_graphs=True, lora_slots=slots)
    kv.reserve(*kv_shape(runner.model.config), dtype=hidden_dtype(runner.model))
    kv.capture_all()
    return kv


def step_alone(runner, kv, prompts, adapters, new_tokens: int) -> tuple[float, float]:
    """(tok/s, mean step seconds) of `new_tokens` decode steps of every row at once (prefill not
    counted), in `kv` (left empty)."""
    logits, cache, mask = runner.prefill_batch(prompts, adapters)
    kv.join(cache, mask)
    tokens = logits.argmax(dim=-1).tolist()
    positions = [len(p) for p in prompts]
    spent = 0.0
    try:
        for step in range(new_tokens):
            started = time.perf_counter()
            out = kv.decode(tokens, [p + step for p in positions], adapters)
            tokens = out.argmax(dim=-1).tolist()  # the engine's one host sync a step
            spent += time.perf_counter() - started
    finally:
        kv.retain([])
    return len(prompts) * new_tokens / spent, spent / new_tokens


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    import tempfile
    from pathlib import Path

    from bench.common import free_port, make_adapters, make_prompts, service_clients, start_service
    from service.adapters.registry import AdapterRegistry
    from service.base_model import load_base
    from service.engine.runner import ModelRunner

    base = load_base(args.model, quantization=args.quantization, device=args.device, cache_dir=args.cache_dir)
    adapter_dir = Path(tempfile.mkdtemp(prefix="hotswap-gap-"))
    names = make_adapters(base.source, adapter_dir, max(args.adapters, args.pool))
    active = names[: args.adapters]
    registry = AdapterRegistry(adapter_dir, base_id=base.source.served_id, base_fingerprint=base.source.fingerprint)
    registry.scan()
    model = base.model
    for name in active:
        model = registry.load(model, name)
    runner = ModelRunner(model, base.device)
    cycle = [None, *active]
    counts = [int(c) for c in args.sweep.split(",") if c]
    served = base.source.served_id
    if args.kv_cache == "auto":
        args.kv_cache = "static" if base.device == "cuda" else "dynamic"
    max_len = args.max_model_len or -(-(args.prompt_tokens + args.new_tokens) // 64) * 64
    settings = {"HOTSWAP_KV_CACHE": args.kv_cache, "HOTSWAP_MAX_MODEL_LEN": str(max_len)}
    kv = step_kv(runner, args.kv_cache, max(counts, default=args.clients), max_len, len(active))

    def workload(n: int, salt: str = "") -> tuple[list[list[int]], list[str | None]]:
        """n prompts, unique to `salt` from their first token (so no stored prefix serves them),
        round-robin over the base and the workload's adapters."""
        prompts = make_prompts(base.tokenizer, n, args.prompt_tokens)
        if salt:
            heads = [base.tokenizer(f"Request {salt}-{i}:").input_ids for i in range(n)]
            prompts = [(head + prompt)[: args.prompt_tokens] for head, prompt in zip(heads, prompts, strict=True)]
        return prompts, [cycle[i % len(cycle)] for i in range(n)]

    def wave(url: str, prompts, adapters) -> dict:
        before = phases(url)
        c = asyncio.run(service_clients(url, served, prompts, adapters, args.new_tokens))
        after = phases(url)
        spent = {k: after[k] - before[k] for k in after}
        return {
            "tok_s": c["tokens"] / c["seconds"],
            "wall_s": c["seconds"],
            "prefill_s": spent["prefill_sum"],
            "decode_s": spent["decode_sum"],
            "decode_steps": spent["decode_count"],
            "packed_s": spent["packed_sum"],  # decode steps that carried prompt chunks
            "ttft_p50_s": c["ttft_p50"],
            "ttft_p99_s": c["ttft_p99"],
        }

    def start(resident: list[str]) -> tuple[Any, str]:
        port = free_port()
        env = {
            **settings,
            "HOTSWAP_PRELOAD_ADAPTERS": ",".join(resident),
            "HOTSWAP_MAX_RESIDENT_ADAPTERS": str(len(resident)),
        }
        service = start_service(args, adapter_dir, port, max(counts + [args.clients]), env=env)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(service_clients(url, served, *workload(len(cycle), "warm"), 2))  # warm-up
        return service, url

    step_alone(runner, kv, *workload(2), 2)  # warm-up
    rows = []
    service, url = start(active)
    try:
        # The step alone right before the service on the same requests (the service idles
        # meanwhile), --repeat times, each figure the median: this machine's speed drifts.
        for n in counts:
            runs = []
            for rep in range(args.repeat):
                prompts, adapters = workload(n, f"n{n}r{rep}")
                rate, step = step_alone(runner, kv, prompts, adapters, args.new_tokens)
                run = {"step_tok_s": rate, "step_ms": step * 1e3, **wave(url, prompts, adapters)}
                run["service_tok_s"] = run.pop("tok_s")
                run["service_over_step"] = run["service_tok_s"] / rate
                run["service_step_ms"] = run["decode_s"] / max(run["decode_steps"], 1) * 1e3
                run["other_s"] = run["wall_s"] - run["prefill_s"] - run["decode_s"] - run["packed_s"]
                again = wave(url, prompts, adapters)  # the same prompts again: their prefixes are stored
                run["repeat_tok_s"], run["repeat_prefill_s"] = again["tok_s"], again["prefill_s"]
                run["repeat_over_step"] = again["tok_s"] / rate
                runs.append(run)
            rows.append({"clients": n, **{k: statistics.median(r[k] for r in runs) for k in runs[0]}})
        graphs = capture_metrics(url)
    finally:
        service.terminate()
        service.wait(timeout=60)
    pool = {}
    if args.pool:
        started = [start(active), start(names[: args.pool])]  # both up, used in turn
        try:
            ratios, rates = [], ([], [])
            for rep in range(args.repeat):
                # In turn, and in the other order every other time: the service measured second
                # in a pair came out about 3% slower (right after the first's wave), which gave
                # the pool 90.4% in one order and 96.6% in the other.
                for which in (0, 1) if rep % 2 == 0 else (1, 0):
                    url = started[which][1]
                    rates[which].append(wave(url, *workload(args.clients, f"pool{which}r{rep}"))["tok_s"])
                ratios.append(rates[1][-1] / rates[0][-1])
        finally:
            for service, _ in started:
                service.terminate()
                service.wait(timeout=60)
        pool = {
            "clients": args.clients,
            "resident": [len(active), args.pool],
            "tok_s": [statistics.median(r) for r in rates],
            "ratio": statistics.median(ratios),
        }
    report(args, base, rows, pool, graphs)
    print(json.dumps({"bench": "gap", "kv_cache": args.kv_cache, "rows": rows, "pool": pool, "graphs": graphs}))
    return 0


def phases(url: str) -> dict[str, float]:
    """The engine's prefill and decode seconds (and decode steps) so far, from /metrics."""
    import httpx

    from bench.common import metric_sum

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        f"{phase}_{kind}": metric_sum(text, f"hotswap_engine_step_seconds_{kind}", phase=phase)
        for phase in ("prefill", "decode", "packed")
        for kind in ("sum", "count")
    }


def capture_metrics(url: str) -> dict[str, float]:
    """CUDA-graph captures at the service's start (seconds) and under traffic (count, seconds):
    issue #22 item 3 wants the latter 0."""
    import httpx

    from bench.common import metric_sum

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        "startup_s": metric_sum(text, "hotswap_cuda_graph_startup_seconds"),
        "live_captures": metric_sum(text, "hotswap_cuda_graph_capture_seconds_count"),
        "live_capture_s": metric_sum(text, "hotswap_cuda_graph_capture_seconds_sum"),
    }


def report(args, base, rows, pool, graphs) -> None:
    import os

    import torch

    device = torch.cuda.get_device_name() if base.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(
        f"\n{args.model} {args.quantization} on {device}; {args.prompt_tokens} prompt + {args.new_tokens} new "
        f"tokens per request; base + {args.adapters} adapters round-robin; KV cache {args.kv_cache}"
    )
    print(
        f"CUDA graphs: captured at start in {graphs['startup_s']:.1f} s; under traffic "
        f"{graphs['live_captures']:.0f} captures ({graphs['live_capture_s']:.2f} s)"
    )
    print(
        f"{'clients':>7} {'step alone':>11} {'service':>9} {'svc/step':>9} | {'wall s':>7} {'prefill':>8} "
        f"{'decode':>8} {'other':>7} | {'step ms alone':>13} {'in service':>10} | {'TTFT p50':>8} "
        f"| {'repeated':>8} {'/step':>6} {'prefill':>8}"
    )
    for r in rows:
        print(
            f"{r['clients']:>7} {r['step_tok_s']:>11.1f} {r['service_tok_s']:>9.1f} {r['service_over_step']:>9.1%} | "
            f"{r['wall_s']:>7.2f} {r['prefill_s']:>8.2f} {r['decode_s']:>8.2f} {r['other_s']:>7.2f} | "
            f"{r['step_ms']:>13.1f} {r['service_step_ms']:>10.1f} | {r['ttft_p50_s']:>8.2f} "
            f"| {r['repeat_tok_s']:>8.1f} {r['repeat_over_step']:>6.1%} {r['repeat_prefill_s']:>8.2f}"
        )
    if pool:
        small, big = pool["tok_s"]
        print(
            f"pool at {pool['clients']} clients: {pool['resident'][0]} adapters resident {small:.1f} tok/s, "
            f"{pool['resident'][1]} resident {big:.1f} tok/s ({pool['ratio']:.1%})"
        )


if __name__ == "__main__":
    raise SystemExit(main())
