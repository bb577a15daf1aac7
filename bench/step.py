"""`python -m bench.step`: the batched engine's decode step, timed for each KV cache.

For each row count, the same prompts (round-robin over the base and --adapters random LoRA
adapters) are prefilled together, then decode steps are timed, one after another, as the engine
runs them (the step, then one argmax and one copy to the host), with:

- dynamic: the left-padded DynamicCache, which grows every step;
- static: the preallocated slots, eager;
- graphs: the slots with each step replayed from a CUDA graph (CUDA only).

Prints a table and a JSON line: the median step time, rows / step time, and the largest
difference of the first step's logits from the dynamic cache's (the same computation, so it
should be rounding only). Capture time is reported apart from the steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def make_parser() -> argparse.ArgumentParser:
    from bench.common import add_model_args

    p = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--rows", default="1,16,64", help="comma-separated batch sizes")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per mode")
    p.add_argument("--modes", default="dynamic,static,graphs")
    return p


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_mode(runner, mode: str, prompts, adapters, steps: int, capacity: int) -> dict:
    import torch

    from service.engine.kvcache import PaddedKV, SlotKV

    device = runner.device.type
    length = len(prompts[0])
    if mode == "dynamic":
        kv = PaddedKV(runner)
    else:
        kv = SlotKV(runner, capacity, length + steps + 8, cuda_graphs=mode == "graphs")
        if mode == "graphs" and not kv.graphs:
            return {"mode": mode, "rows": len(prompts), "skipped": "CUDA graphs need CUDA"}
    logits, cache, mask = runner.prefill_batch(prompts, adapters)
    kv.join(cache, mask)
    tokens = logits.argmax(dim=-1).tolist()
    positions = [length] * len(prompts)
    started = time.perf_counter()
    first = kv.decode(tokens, positions, adapters)  # includes the capture, for graphs
    sync(device)
    first_seconds = time.perf_counter() - started
    reference = first.clone()
    times = []
    for step in range(1, steps + 1):
        started = time.perf_counter()
        out = kv.decode(tokens, [p + step for p in positions], adapters)
        tokens = out.argmax(dim=-1).tolist()  # the engine's one sync a step
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    row = {
        "mode": mode,
        "rows": len(prompts),
        "step_ms": step_s * 1e3,
        "tok_s": len(prompts) / step_s,
        "first_step_ms": first_seconds * 1e3,
        "first_logits": reference,
    }
    if mode != "dynamic":
        row["captures"] = getattr(kv, "captures", 0)
        row["graphs_used"] = bool(getattr(kv, "graphs", False))
    del kv, cache
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from bench.common import load_with_adapters, make_prompts
    from service.engine.runner import ModelRunner

    base, model, names, _ = load_with_adapters(args)
    runner = ModelRunner(model, base.device)
    counts = [int(c) for c in args.rows.split(",") if c]
    cycle = [None, *names]
    results = []
    for n in counts:
        prompts = make_prompts(base.tokenizer, n, args.prompt_tokens)
        adapters = [cycle[i % len(cycle)] for i in range(n)]
        dynamic = None
        for mode in args.modes.split(","):
            try:
                row = run_mode(runner, mode, prompts, adapters, args.steps, max(counts))
            except Exception as exc:  # report and go on with the other modes
                row = {"mode": mode, "rows": n, "error": f"{type(exc).__name__}: {exc}"}
            logits = row.pop("first_logits", None)
            if logits is not None:
                if mode == "dynamic":
                    dynamic = logits
                elif dynamic is not None:
                    row["max_abs_diff_vs_dynamic"] = float((logits - dynamic).abs().max())
                    row["same_argmax"] = bool((logits.argmax(-1) == dynamic.argmax(-1)).all())
            results.append(row)
            print(json.dumps(row), flush=True)
    report(args, base, results)
    return 0


def report(args, base, results) -> None:
    import os

    import torch

    device = torch.cuda.get_device_name() if base.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(
        f"\n{args.model} {args.quantization} on {device}; decode step after {args.prompt_tokens} prompt "
        f"tokens, base + {args.adapters} adapters round-robin; median of {args.steps} steps"
    )
    print(f"{'rows':>5} {'mode':>8} {'step ms':>9} {'tok/s':>9} {'first ms':>9} {'vs dynamic':>11}")
    for r in results:
        if "step_ms" not in r:
            print(f"{r.get('rows', ''):>5} {r['mode']:>8}  {r.get('error') or r.get('skipped')}")
            continue
        diff = r.get("max_abs_diff_vs_dynamic")
        print(
            f"{r['rows']:>5} {r['mode']:>8} {r['step_ms']:>9.2f} {r['tok_s']:>9.1f} {r['first_step_ms']:>9.1f} "
            f"{'' if diff is None else f'{diff:.3g}':>11}"
        )
    print(
        json.dumps(
            {
                "model": args.model,
                "quantization": args.quantization,
                "device": device,
                "prompt_tokens": args.prompt_tokens,
                "rows": results,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
