"""The base model under response_format json_schema: five realistic schemas, fifty prompts.

    .venv/bin/python -m bench.structured_base [--quantization nf4] [--max-tokens 256]

Each schema (nested objects, arrays, enums, numbers, integers, booleans, required fields; strings
and arrays bounded, as an API's would be) gets ten prompts written for it; every request runs
through the batched engine under the schema's grammar, greedy, as `response_format` does in the
service. Reports how many outputs parse and validate, and how many the budget cut
(finish_reason "length"). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json

S = {"type": "string", "maxLength": 40}
SCHEMAS = {
    "contact": {
        "type": "object",
        "properties": {
            "name": S,
            "email": S,
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": S, "maxItems": 3},
        },
        "required": ["name", "email", "age"],
    },
    "order": {
        "type": "object",
        "properties": {
            "order_id": S,
            "status": {"enum": ["new", "paid", "shipped", "cancelled"]},
            "total": {"type": "number", "minimum": 0, "maximum": 100000, "multipleOf": 0.01},  # money
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    "required": ["sku", "qty"],
                },
            },
        },
        "required": ["order_id", "status", "total", "items"],
    },
    "event": {
        "type": "object",
        "properties": {
            "title": S,
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "online": {"type": "boolean"},
            "location": {"type": "object", "properties": {"city": S, "country": S}, "required": ["city", "country"]},
        },
        "required": ["title", "date", "online", "location"],
    },
    "review": {
        "type": "object",
        "properties": {
            "product": S,
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            "sentiment": {"enum": ["positive", "neutral", "negative"]},
            "pros": {"type": "array", "items": S, "maxItems": 3},
            "cons": {"type": "array", "items": S, "maxItems": 3},
        },
        "required": ["product", "rating", "sentiment", "pros", "cons"],
    },
    "recipe": {
        "type": "object",
        "properties": {
            "name": S,
            "servings": {"type": "integer", "minimum": 1, "maximum": 12},
            "vegetarian": {"type": "boolean"},
            "ingredients": {
                "type": "array",
                "minItems": 1,
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {"item": S, "grams": {"type": "number", "minimum": 0}},
                    "required": ["item", "grams"],
                },
            },
        },
        "required": ["name", "servings", "vegetarian", "ingredients"],
    },
}
PROMPTS = {
    "contact": [
        "Ana Silva, 34, ana@example.com, likes hiking.",
        "Extract the contact: Bob Li (bob.li@mail.org), aged 51.",
        "New customer: Maria Rossi, maria.r@shop.it, 28 years old, VIP.",
        "Contact card for Tom, 19, tom@uni.edu.",
        "Kenji Sato, kenji@corp.jp, age 45, tags: sales, tokyo.",
        "Record: Lea Martin, 62, lea.martin@free.fr.",
        "Please store Omar Haddad, omar@haddad.dev, 37.",
        "Sam, sam@example.net, turning 30 next week.",
        "Priya Patel is 41 and writes from priya@patel.in.",
        "Add Jonas Berg (jonas@berg.se), 23, student.",
    ],
    "order": [
        "Order A-100: two lamps (SKU L-1) paid, total 59.90.",
        "Cancelled order B-7, one kettle K-2, 25 euros.",
        "Order 5531 shipped: 3 x mug M-9, 1 x plate P-4, total 41.",
        "New order Z-1 for 1 paddle CP-480 at 189.",
        "Order C-42 is paid: 2 socks S-2 at 5 each.",
        "Shipped: order 88, items T-1 (x1), T-2 (x2), total 72.5.",
        "Order Q-9 new, one bike helmet H-3, 79.99.",
        "Order 77 cancelled, 4 pens P-1, total 8.",
        "Paid order D-3: 1 tent BT-3P, 249.",
        "Order N-5: 2 jars of honey HH-1, new, 18.40.",
    ],
    "event": [
        "PyCon Lisbon on 2026-06-12 in Lisbon, Portugal.",
        "Online webinar 'LoRA basics' on 2026-03-03.",
        "Jazz night, Montreal Canada, 2026-08-20.",
        "Team offsite in Oslo, Norway on 2026-09-01.",
        "Book club (online) 2026-02-14.",
        "Marathon in Boston, USA, 2026-04-20.",
        "Hackathon at Berlin, Germany, 2026-11-07.",
        "Virtual town hall on 2026-01-30.",
        "Wine tasting in Porto, Portugal, 2026-10-10.",
        "Film festival, Busan, South Korea, 2026-10-02.",
    ],
    "review": [
        "The Aurora lamp is bright and cheap but the cable is short. 4 stars.",
        "Terrible kettle, leaks. 1/5.",
        "Decent headphones, good bass, tight fit, 3 stars.",
        "Love this backpack! Light, waterproof. 5/5.",
        "The mixer is fine, a bit loud. 3 out of 5.",
        "Broke after a week, avoid this phone case. 1 star.",
        "Great pan, heavy though. 4/5.",
        "Camera works, app is slow, 2 stars.",
        "Perfect running shoes, comfy and light, five stars.",
        "Okay-ish desk, wobbly legs, 2/5.",
    ],
    "recipe": [
        "Pancakes for 4: 200 g flour, 2 eggs, 300 g milk.",
        "Vegetarian chili for 6 with beans and tomatoes.",
        "Guacamole: 2 avocados (400 g), 1 lime, salt; serves 2.",
        "Omelette for one with 3 eggs and 30 g cheese.",
        "Tomato soup for 4, vegetarian: 800 g tomatoes, 1 onion.",
        "Chicken curry for 4, 500 g chicken.",
        "Pesto pasta for 2: 200 g pasta, 60 g pesto.",
        "Banana bread for 8: 3 bananas, 250 g flour.",
        "Greek salad for 2, vegetarian, feta 100 g.",
        "Beef stew for 6 with 1 kg beef and carrots.",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    import jsonschema

    from service.engine import EngineRequest, SamplingParams
    from service.grammar import GrammarCompiler
    from service.metrics import Metrics
    from service.runtime import load_runtime
    from service.serving.chat import chat_prompt
    from service.settings import Settings

    runtime = load_runtime(Settings(quantization=args.quantization, device="cpu", max_batch_size=25), Metrics())
    tok, engine, compiler = runtime.tokenizer, runtime.engine, GrammarCompiler(runtime.tokenizer)
    grammars = {name: compiler.compile_now(schema) for name, schema in SCHEMAS.items()}

    async def one(i, name, text):
        messages = [{"role": "user", "content": f"{text}\nAnswer with a JSON object."}]
        ids = tok(chat_prompt(tok, messages), add_special_tokens=False).input_ids
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, grammar=grammars[name])
        outs = [o async for o in engine.generate(EngineRequest(f"r{i}", tuple(ids), None, params))]
        return (
            name,
            tok.decode([t for o in outs for t in o.token_ids], skip_special_tokens=True),
            outs[-1].finish_reason,
        )

    async def run_all():
        await engine.start()
        try:
            jobs = [(name, text) for name, texts in PROMPTS.items() for text in texts]
            return await asyncio.gather(*(one(i, n, t) for i, (n, t) in enumerate(jobs)))
        finally:
            await engine.stop()

    report = {}
    for name, text, finish in asyncio.run(run_all()):
        row = report.setdefault(name, {"prompts": 0, "valid": 0, "length": 0, "failures": []})
        row["prompts"] += 1
        row["length"] += finish == "length"
        try:
            jsonschema.validate(json.loads(text), SCHEMAS[name])
            row["valid"] += 1
        except (ValueError, jsonschema.ValidationError) as exc:
            row["failures"].append(f"{finish}: {str(exc)[:80]}: {text[-120:]}")
    total = sum(r["valid"] for r in report.values())
    print(f"{'schema':<10} {'valid':>6} {'cut by budget':>14}")
    for name, row in report.items():
        print(f"{name:<10} {row['valid']:>3}/{row['prompts']:<2} {row['length']:>14}")
    print(f"all: {total}/{sum(r['prompts'] for r in report.values())} parse and validate")
    print(json.dumps({"bench": "structured_base", "quantization": args.quantization, "schemas": report}))


if __name__ == "__main__":
    main()
