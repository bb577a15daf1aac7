"""The schema adapter under the service's grammar: valid JSON and the product named.

    .venv/bin/python -m bench.schema_adapter [--quantization nf4] [--temperatures 0,0.8]

Runs the shipped `adapters/schema` on the embedded SmolLM2 through the batched engine, as the
service does, over the 20 held-out MarketMail products (the recipe's seeded split) and the 20
unseen ones in data/schema/unseen.jsonl, at each temperature (seeded), with the manifest's
grammar enforced (the service default) and without it. Prints rates, the outputs that are
invalid or do not name the product, and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def verdict(text: str, product: str, schema: dict) -> tuple[bool, bool]:
    """(schema-valid JSON, and valid with the product named): training's own verdict, split."""
    from training.evaluation import marketmail_verdict

    ok, why = marketmail_verdict(text, product, schema)
    return ok or why.startswith("product not named"), ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--temperatures", default="0,0.8")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    from service.engine import EngineRequest, SamplingParams
    from service.grammar import GrammarCompiler
    from service.metrics import Metrics
    from service.runtime import load_runtime
    from service.settings import Settings
    from training.data import load_records, split

    held = split(load_records(str(ROOT / "data/schema/marketmail.jsonl"), ("product", "description")), 20, 0)[1]
    unseen = [json.loads(line) for line in (ROOT / "data/schema/unseen.jsonl").read_text().splitlines()]
    runtime = load_runtime(
        Settings(
            quantization=args.quantization,
            device="cpu",
            adapter_dir=ROOT / "adapters",
            engine="batched",
            max_batch_size=20,
        ),
        Metrics(),
    )
    manifest = next(r.manifest for r in runtime.registry.ready() if r.name == "schema")
    schema = manifest.output.json_schema
    grammar = GrammarCompiler(runtime.tokenizer).compile_now(schema)
    tok, engine = runtime.tokenizer, runtime.engine

    async def generate(records, temperature, constrained):
        async def one(i, record):
            prompt = manifest.render_prompt({"product": record["product"], "description": record["description"]})
            params = SamplingParams(
                max_tokens=args.max_tokens,
                temperature=temperature,
                seed=1000 + i,
                grammar=grammar if constrained else None,
            )
            request = EngineRequest(f"r{i}", tuple(tok(prompt).input_ids), "schema", params)
            ids = [t for o in [o async for o in engine.generate(request)] for t in o.token_ids]
            return tok.decode(ids, skip_special_tokens=True)

        return await asyncio.gather(*(one(i, r) for i, r in enumerate(records)))

    async def run_all():
        await engine.start()
        try:
            report = {}
            for temperature in [float(t) for t in args.temperatures.split(",")]:
                for constrained in (True, False):
                    for label, records in (("held_out", held), ("unseen", unseen)):
                        outs = await generate(records, temperature, constrained)
                        verdicts = [verdict(o, r["product"], schema) for o, r in zip(outs, records, strict=True)]
                        key = f"t{temperature:g}_{'grammar' if constrained else 'free'}_{label}"
                        missed = [
                            f"{r['product']}: {o.strip()[:160]}"
                            for o, r, (_, named) in zip(outs, records, verdicts, strict=True)
                            if not named
                        ]
                        report[key] = {
                            "valid": sum(v for v, _ in verdicts) / len(records),
                            "named": sum(n for _, n in verdicts) / len(records),
                            "n": len(records),
                            "missed": missed,
                        }
                        print(
                            f"{key:<32} valid {report[key]['valid']:.0%}  product named {report[key]['named']:.0%}",
                            flush=True,
                        )
                        for line in missed:
                            print(f"    missed {line}", flush=True)
            return report
        finally:
            await engine.stop()

    print(json.dumps({"bench": "schema_adapter", "quantization": args.quantization, **asyncio.run(run_all())}))


if __name__ == "__main__":
    main()
