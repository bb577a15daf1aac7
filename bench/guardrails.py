"""Guardrails: precision/recall of PII redaction per kind, and the cost of the hook chain.

    .venv/bin/python -m bench.guardrails [--config default] [--repeat 300]
    .venv/bin/python -m bench.guardrails --corpus ../shared/data/dolly/databricks-dolly-15k.jsonl

`--corpus` runs the configured pre chain over every record of a JSONL file of text that was not
written with the detectors in mind (Dolly's instruction + context by default) and reports how
many records each hook blocks or rewrites, by entity, with examples of each.

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
import unicodedata
from collections import Counter

from service.guardrails.base import GuardedOutput, GuardedRequest
from service.guardrails.config import load
from service.guardrails.pii import PIIRedactor
from service.guardrails.pii_detectors import KINDS
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
        table[kind] = {
            "precision": round(p, 3),
            "recall": round(r, 3),
            "values": tp[kind] + fn[kind],
            "false_positives": fp[kind],
        }
    return table


def timed(fn, repeat: int) -> dict[str, float]:
    fn()  # warm caches (regex compilation, the skeleton's fold cache)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 3),
        "p99_ms": round(samples[int(len(samples) * 0.99) - 1], 3),
    }


def cost(config: str, repeat: int) -> dict[str, dict[str, float]]:
    guardrails = load(config)
    chain = guardrails.default
    metrics = Metrics()
    results = {}
    for label, with_pii in (("clean", False), ("with_pii", True)):
        text = two_kb(with_pii)
        request = GuardedRequest("completions", "base", None, prompts=(text,))
        results[f"pre_2kb_{label}"] = timed(
            lambda request=request: run_pre(chain, request, metrics, param="prompt"), repeat
        )

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


def corpus_report(config: str, path: str, fields: list[str], examples: int = 5) -> dict:
    """The pre chain over every record: records blocked and rewritten, by hook and entity."""
    chain = load(config).default
    counts = {"blocked": Counter(), "rewritten": Counter()}
    records = Counter()
    samples: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            texts = tuple(str(record[f]) for f in fields if record.get(f))
            if not texts:
                continue
            records["total"] += 1
            request = GuardedRequest("completions", "base", None, prompts=texts)
            outcome = None
            for hook in chain.pre:  # as run_pre does: each hook sees what the previous passed on
                verdict = hook.pre(request)
                if verdict.action == "allow":
                    continue
                outcome = "blocked" if verdict.action == "block" else outcome or "rewritten"
                for entity in verdict.details or {"-": 1}:
                    key = f"{hook.name}:{entity}"
                    counts["blocked" if verdict.action == "block" else "rewritten"][key] += 1
                    if len(samples.setdefault(key, [])) < examples:
                        samples[key].append(_excerpt(hook, request, verdict))
                if verdict.action == "block":
                    break
                request = verdict.request or request
            if outcome:
                records[outcome] += 1
    return {
        "records": records["total"],
        "blocked_records": records["blocked"],
        "rewritten_records": records["rewritten"],
        "blocked": dict(counts["blocked"]),
        "rewritten": dict(counts["rewritten"]),
        "examples": samples,
    }


def _excerpt(hook, request: GuardedRequest, verdict) -> str:
    """The text around what the hook found (PII: the values it redacted)."""
    findings = getattr(hook, "findings", None)
    if findings is not None:
        found = [f"{kind} {text[a:b]!r}" for text in request.texts() for kind, a, b in findings(text)]
        return "; ".join(found)[:200]
    invisible = Counter(f"U+{ord(c):04X}" for t in request.texts() for c in t if unicodedata.category(c) == "Cf")
    return f"{verdict.reason} ({', '.join(f'{c} x{n}' for c, n in invisible.items())})"[:200]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", help="guardrails YAML, or 'default'")
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--corpus", help="a JSONL file: report what the pre chain does to each record")
    parser.add_argument("--fields", default="instruction,context", help="the record fields sent as prompts")
    args = parser.parse_args()
    if args.corpus:
        report = corpus_report(args.config, args.corpus, args.fields.split(","))
        total = report["records"]
        print(
            f"{total} records; blocked {report['blocked_records']} "
            f"({report['blocked_records'] / total:.4%}), rewritten {report['rewritten_records']} "
            f"({report['rewritten_records'] / total:.2%})"
        )
        for outcome in ("blocked", "rewritten"):
            for key, n in sorted(report[outcome].items(), key=lambda kv: -kv[1]):
                print(f"  {outcome:<9} {key:<28} {n:>6}   e.g. {report['examples'][key][0]}")
        print(
            json.dumps(
                {
                    "bench": "guardrails_corpus",
                    "config": args.config,
                    "corpus": args.corpus,
                    **{k: v for k, v in report.items() if k != "examples"},
                }
            )
        )
        return
    quality = score()
    print(f"{'kind':<12} {'precision':>9} {'recall':>7} {'values':>7} {'false +':>8}")
    for kind, row in quality.items():
        print(
            f"{kind:<12} {row['precision']:>9.3f} {row['recall']:>7.3f} {row['values']:>7} {row['false_positives']:>8}"
        )
    costs = cost(args.config, args.repeat)
    print(f"\n{'hook chain (' + args.config + ')':<40} {'median ms':>10} {'p99 ms':>8}")
    for name, row in costs.items():
        print(f"{name:<40} {row['median_ms']:>10.3f} {row['p99_ms']:>8.3f}")
    print(json.dumps({"bench": "guardrails", "config": args.config, "quality": quality, "cost": costs}))


if __name__ == "__main__":
    main()
