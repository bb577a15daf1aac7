"""Which grammar engine constrains hotswap's decoding: llguidance against xgrammar, measured.

    .venv/bin/python -m bench.grammar_engines [--repeat 3]

For each engine, on the embedded SmolLM2 tokenizer (49,152 tokens) and three JSON schemas (the
schema adapter's MarketMail, a nested order with arrays, enums and numbers, and any JSON object):
the time to prepare the tokenizer once, to compile each grammar (cold), and per token of a valid
document: the mask computation and its application to a row of logits. Prints a table and one
JSON line. Both engines are used by vLLM and SGLang; docs/structured-outputs.md has the choice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ASSET = Path(__file__).resolve().parents[1] / "service" / "assets" / "smollm2-tokenizer"
ORDER = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string"},
        "status": {"enum": ["new", "paid", "shipped"]},
        "total": {"type": "number", "minimum": 0},
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "vip": {"type": "boolean"}},
            "required": ["name"],
            "additionalProperties": False,
        },
    },
    "required": ["order_id", "status", "total", "items", "customer"],
    "additionalProperties": False,
}
DOCS = {
    "marketmail": '{"subject": "Meet the Lakeside paddle", "body": "Carbon, 480 g, made for long days '
    'on the water.", "call_to_action": "Order yours today"}',
    "order": '{"order_id": "A-1029", "status": "paid", "total": 129.5, "items": [{"sku": "P-1", "qty": 2}, '
    '{"sku": "K-7", "qty": 1}], "customer": {"name": "Ana", "vip": true}}',
    "json_object": '{"city": "Lisbon", "population": 545000, "tags": ["coast", "hills"]}',
}


def schemas() -> dict[str, dict | None]:
    manifest = json.loads((Path(__file__).resolve().parents[1] / "adapters" / "schema" / "hotswap.json").read_text())
    return {"marketmail": manifest["output"]["json_schema"], "order": ORDER, "json_object": None}


def run_llguidance(tokenizer, repeat: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    started = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer)
    setup = time.perf_counter() - started
    results = {"tokenizer_setup_s": setup}
    for name, schema in schemas().items():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema if schema is not None else {"type": "object"}, defaults={"whitespace_flexible": True}
        )
        compile_s, mask_s, apply_s = [], [], []
        for _ in range(repeat):
            started = time.perf_counter()
            matcher = llguidance.LLMatcher(lltok, grammar)
            compile_s.append(time.perf_counter() - started)
            bitmask = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)
            logits = torch.randn(1, len(tokenizer))
            for token in tokenizer(DOCS[name], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]:
                started = time.perf_counter()
                llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
                middle = time.perf_counter()
                llguidance.torch.apply_token_bitmask_inplace(logits, bitmask)
                apply_s.append(time.perf_counter() - middle)
                mask_s.append(middle - started)
                assert matcher.consume_token(token), (name, token, matcher.get_error())
            assert matcher.is_stopped() or matcher.is_accepting(), name
        results[name] = _summary(compile_s, mask_s, apply_s)
    return results


def run_xgrammar(tokenizer, repeat: int) -> dict:
    import xgrammar as xgr

    started = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    setup = time.perf_counter() - started
    results = {"tokenizer_setup_s": setup}
    for name, schema in schemas().items():
        compile_s, mask_s, apply_s = [], [], []
        for _ in range(repeat):
            compiler = xgr.GrammarCompiler(info, cache_enabled=False)
            started = time.perf_counter()
            compiled = (
                compiler.compile_json_schema(json.dumps(schema))
                if schema is not None
                else compiler.compile_builtin_json_grammar()
            )
            matcher = xgr.GrammarMatcher(compiled)
            compile_s.append(time.perf_counter() - started)
            bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
            logits = torch.randn(1, len(tokenizer))
            for token in tokenizer(DOCS[name], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]:
                started = time.perf_counter()
                matcher.fill_next_token_bitmask(bitmask, 0)
                middle = time.perf_counter()
                xgr.apply_token_bitmask_inplace(logits, bitmask)
                apply_s.append(time.perf_counter() - middle)
                mask_s.append(middle - started)
                assert matcher.accept_token(token), (name, token)
            assert matcher.is_terminated(), name
        results[name] = _summary(compile_s, mask_s, apply_s)
    return results


def _summary(compile_s, mask_s, apply_s) -> dict:
    return {
        "compile_ms_median": round(statistics.median(compile_s) * 1000, 2),
        "mask_us_median": round(statistics.median(mask_s) * 1e6, 1),
        "mask_us_p99": round(sorted(mask_s)[int(len(mask_s) * 0.99) - 1] * 1e6, 1),
        "apply_us_median": round(statistics.median(apply_s) * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSET)
    report = {"llguidance": run_llguidance(tokenizer, args.repeat), "xgrammar": run_xgrammar(tokenizer, args.repeat)}
    print(f"{'engine':<11} {'schema':<12} {'compile ms':>10} {'mask us p50':>11} {'mask us p99':>11} {'apply us':>9}")
    for engine, rows in report.items():
        print(f"{engine:<11} {'(tokenizer)':<12} {rows['tokenizer_setup_s'] * 1000:>10.1f}")
        for name, row in rows.items():
            if isinstance(row, dict):
                print(
                    f"{engine:<11} {name:<12} {row['compile_ms_median']:>10.2f} {row['mask_us_median']:>11.1f} "
                    f"{row['mask_us_p99']:>11.1f} {row['apply_us_median']:>9.1f}"
                )
    print(json.dumps({"bench": "grammar_engines", **report}))


if __name__ == "__main__":
    main()
