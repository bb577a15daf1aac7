"""`python -m bench.numerics`: what each numeric path costs on this CPU, and how exact prefix reuse is.

Issue 29's choices, measured in one run on the embedded SmolLM2 nf4 (service/engine/attention.py):

- kernel: bitsandbytes' fused 4-bit kernel with bf16 activations (what it picks on CPUs with
  AVX512-BF16 or AMX) against its dequantize-to-fp32 path: a decode step and a prefill;
- attention: prompt attention in float64 (the service's default on CPUs) against fp32 SDPA:
  a prefill at several lengths, and a decode step (which stays fp32 in both);
- exactness: the largest logit difference between a whole prefill and the same prompt after its
  stored prefix, for the base and a random adapter, under each combination.

Same-run medians; ratios above 1 mean the second named is slower. Run it alone (two torch
processes on two cores thrash). Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.numerics", description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "hotswap")
    p.add_argument("--prefill", default="64,256,1000", help="prompt lengths for the prefill timings")
    p.add_argument("--repeat", type=int, default=5)
    return p


def median_seconds(fn, repeat: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def set_kernel(model, fused: bool) -> None:
    """bitsandbytes' fused CPU kernel (bf16 activations) on or off, weights unpacked if off."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = fused and bnb.functional.has_avx512bf16()
            state = module.weight.quant_state
            if not fused and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state
                )


def set_attention(runner, wide: bool) -> None:
    from service.engine.attention import WIDE

    config = runner.model.get_base_model().config
    config._attn_implementation = WIDE if wide else "sdpa"


def reuse_error(runner, tok, adapter) -> float:
    from service.engine.prefix import BLOCK, Hit

    worst = 0.0
    for text in ("The capital of France is", "Write a haiku about the sea, please, in English"):
        ids = tok(text).input_ids
        whole, _ = runner.prefill(ids, adapter)
        for stored in range(BLOCK, len(ids), BLOCK):
            _, cache = runner.prefill(ids[:stored], adapter)
            rest, _ = runner.prefill(ids, adapter, past=Hit(stored, cache))
            worst = max(worst, (whole - rest).abs().max().item())
    return worst


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    import bitsandbytes as bnb
    import torch
    from transformers import DynamicCache

    from service.base_model import resolve_source
    from service.metrics import Metrics
    from service.runtime import load_runtime
    from service.settings import Settings
    from tests.factories import make_lora_adapter, serve_through_slots

    source = resolve_source("embedded:smollm2-135m-instruct", args.cache_dir)
    adapters = Path(tempfile.mkdtemp()) / "adapters"
    make_lora_adapter(source.path, adapters / "rand", fingerprint=source.fingerprint, base_id=source.served_id, seed=5)
    settings = Settings(quantization="nf4", device="cpu", adapter_dir=adapters, cache_dir=args.cache_dir)
    runtime = load_runtime(settings, Metrics())
    slot = serve_through_slots(runtime, ("rand",))["rand"]
    runner, tok, model = runtime.engine.runner, runtime.tokenizer, runtime.engine.runner.model
    fused_available = bnb.functional.has_avx512bf16()
    lengths = [int(n) for n in args.prefill.split(",")]

    def decode(rows: int, context: int):
        cache = DynamicCache()
        with torch.inference_mode():
            model(input_ids=torch.randint(0, 1000, (rows, context)), past_key_values=cache)

        def step():
            with torch.inference_mode():
                model(input_ids=torch.randint(0, 1000, (rows, 1)), past_key_values=cache)
                cache.crop(-1)

        return step

    def prefill(length: int):
        ids = torch.randint(0, 1000, (length,)).tolist()
        return lambda: runner.prefill(ids, None)

    results: dict[str, dict] = {}
    for fused in (True, False) if fused_available else (False,):
        set_kernel(model, fused)
        for wide in (True, False):
            set_attention(runner, wide)
            name = f"{'bf16-kernel' if fused else 'fp32-dequant'} + {'fp64' if wide else 'fp32'} prompt attention"
            row: dict = {
                "reuse_error_base": reuse_error(runner, tok, None),
                "reuse_error_adapter": reuse_error(runner, tok, slot),
            }
            for rows, context in ((1, 128), (16, 512)):
                row[f"decode_{rows}x{context}_ms"] = 1000 * median_seconds(decode(rows, context), args.repeat)
            for length in lengths:
                row[f"prefill_{length}_ms"] = 1000 * median_seconds(prefill(length), max(2, args.repeat // 2))
            results[name] = row
    set_kernel(model, True)
    set_attention(runner, True)

    keys = list(next(iter(results.values())))
    print("| path | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3g}" for k in keys) + " |")
    print(json.dumps({"fused_kernel_available": fused_available, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
