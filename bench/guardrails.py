"""Guardrails: precision/recall of PII redaction per kind, and the cost of the hook chain.

    .venv/bin/python -m bench.guardrails [--config default] [--repeat 300]

Quality is scored on the adversarial corpus in tests/service/guardrails/corpus.py (a value
counts as found when a redaction of the right kind covers exactly its characters). Cost is the
wall time of the configured pre chain on a 2 KB prompt, and of the post chain on a 2 KB output
(whole, and streamed in 4-character deltas), median and p99 over `--repeat` runs. Prints a
table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter

from service.guardrails.base import GuardedOutput, GuardedRequest
from service.guardrails.config import load
from service.guardrails.pii import KINDS, PIIRedactor
from service.guardrails.runner import OutputGuard, run_pre
from service.metrics import Metrics
from tests.service.guardrails.corpus import CORPUS

PROSE = (
    "Summarise the customer's message below for the support team, in three bullet points, and "
    "suggest a next step. Keep product codes such as SKU 4821-77-X and order dates like "
    "2024-05-17 as they are; prices ($1,299.99) matter too. "
)
PII_LINE = "Customer: Ana Silva, ana.silva@example.com, +44 20 7946 0958, card 4111 1111 1111 1111. "


def two_kb(with_pii: bool) -> str:
    text = ""
    while len(text) < 2048:
        text += PROSE + (PII_LINE if with_pii and len(text) < 300 else "")
    return text[:2048]


def score() -> dict[str, dict[str, float]]:
    hook = PIIRedactor()
    tp, fp, fn = Counter(), Counter(), Counter()
    for text, expected in CORPUS:
        want = Counter((kind, value) for kind, value in expected)
        got = Counter((kind, text[a:b]) for kind, a, b in hook.findings(text))
        for key in want | got:
            hit = min(want[key], got[key])
            tp[key[0]] += hit
            fn[key[0]] += want[key] - hit
            fp[key[0]] += got[key] - hit
    table = {}
    for kind in KINDS:
        p = tp[kind] / (tp[kind] + fp[kind]) if tp[kind] + fp[kind] else 1.0
        r = tp[kind] / (tp[kind] + fn[kind]) if tp[kind] + fn[kind] else 1.0
        table[kind] = {"precision": round(p, 3), "recall": round(r, 3), "values": tp[kind] + fn[kind],
                       "false_positives": fp[kind]}
    return table


def timed(fn, repeat: int) -> dict[str, float]:
    fn()  # warm caches (regex compilation, the skeleton's fold cache)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {"median_ms": round(statistics.median(samples), 3), "p99_ms": round(samples[int(len(samples) * 0.99) - 1], 3)}


def cost(config: str, repeat: int) -> dict[str, dict[str, float]]:
    guardrails = load(config)
    chain = guardrails.default
    metrics = Metrics()
    results = {}
    for label, with_pii in (("clean", False), ("with_pii", True)):
        text = two_kb(with_pii)
        request = GuardedRequest("completions", "base", None, prompts=(text,))
        results[f"pre_2kb_{label}"] = timed(lambda request=request: run_pre(chain, request, metrics, param="prompt"), repeat)

        def post_whole(text=text):
            guard = OutputGuard(chain, GuardedOutput("base", None, ""), metrics, 0)
            return guard.feed(text) + guard.finish()

        def post_stream(text=text):
            guard = OutputGuard(chain, GuardedOutput("base", None, ""), metrics, 0)
            out = [guard.feed(text[i : i + 4]) for i in range(0, len(text), 4)]
            return "".join(out) + guard.finish()

        results[f"post_2kb_{label}"] = timed(post_whole, repeat)
        results[f"post_2kb_{label}_streamed_4_chars"] = timed(post_stream, max(repeat // 10, 10))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", help="guardrails YAML, or 'default'")
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args()
    quality = score()
    print(f"{'kind':<12} {'precision':>9} {'recall':>7} {'values':>7} {'false +':>8}")
    for kind, row in quality.items():
        print(f"{kind:<12} {row['precision']:>9.3f} {row['recall']:>7.3f} {row['values']:>7} {row['false_positives']:>8}")
    costs = cost(args.config, args.repeat)
    print(f"\n{'hook chain (' + args.config + ')':<40} {'median ms':>10} {'p99 ms':>8}")
    for name, row in costs.items():
        print(f"{name:<40} {row['median_ms']:>10.3f} {row['p99_ms']:>8.3f}")
    print(json.dumps({"bench": "guardrails", "config": args.config, "quality": quality, "cost": costs}))


if __name__ == "__main__":
    main()
