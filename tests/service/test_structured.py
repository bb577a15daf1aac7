"""Structured outputs (issue #20): grammars in the engine, `response_format` in the API, and
JSON adapters enforced by default, on the tiny Llama and its tiny tokenizer."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from fastapi.testclient import TestClient

from service.app import build_app
from service.engine import EngineRequest, SamplingParams
from service.grammar import JSON_OBJECT, GrammarCompiler
from service.metrics import Metrics
from service.runtime import load_runtime
from tests.factories import make_engine as make
from tests.factories import make_lora_adapter, preload_adapters, tiny_settings
from tests.factories import run_engine as run
from tests.support import events

# Finite: a random model cannot wander in it forever, so every row must end with "stop".
SMALL = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "size": {"enum": ["s", "m", "l"]},
        "tags": {"type": "array", "items": {"enum": [1, 2]}, "maxItems": 2},
    },
    "required": ["ok", "size", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def runtime(tiny, cache_dir):
    settings = tiny_settings(tiny, cache_dir)
    return preload_adapters(load_runtime(settings, Metrics()))


@pytest.fixture(scope="module")
def compiler(runtime):
    return GrammarCompiler(runtime.tokenizer)


@pytest.mark.parametrize("kv", ["dynamic", "static"])
def test_grammar_rows_beside_free_rows_and_adapters_in_one_batch(runtime, compiler, kv):
    grammar = compiler.compile_now(SMALL)
    tok = runtime.tokenizer
    rows = [  # (adapter, grammar, temperature, seed)
        (None, grammar, 0.0, None),
        ("alpha", grammar, 0.9, 1),
        ("beta", None, 0.0, None),
        ("alpha", grammar, 0.9, 2),
        (None, None, 0.9, 3),
        ("beta", grammar, 0.0, None),
    ]
    prompt = tuple(tok("Return JSON:").input_ids)

    async def body(engine):
        async def one(i, adapter, g, temperature, seed):
            params = SamplingParams(max_tokens=60, temperature=temperature, seed=seed, logprobs=2, grammar=g)
            outs = [o async for o in engine.generate(EngineRequest(f"r{i}", prompt, adapter, params))]
            return [t for o in outs for t in o.token_ids], outs

        return await asyncio.gather(*(one(i, *r) for i, r in enumerate(rows)))

    results = run(make(runtime.engine.runner, kv=kv), body)
    for (adapter, g, _, _), (tokens, outs) in zip(rows, results, strict=True):
        if g is None:
            continue
        assert outs[-1].finish_reason == "stop", (adapter, tok.decode(tokens))
        jsonschema.validate(json.loads(tok.decode(tokens)), SMALL)
        # the reported distribution is the masked one: each chosen token has a finite log-prob,
        # and no alternative the grammar forbade is listed
        assert all(o.logprobs[0].logprob > float("-inf") for o in outs)


def test_a_budget_that_runs_out_first_gives_length(runtime, compiler):
    grammar = compiler.compile_now(SMALL)
    prompt = tuple(runtime.tokenizer("x").input_ids)

    async def body(engine):
        params = SamplingParams(max_tokens=3, temperature=0.0, grammar=grammar)
        return [o async for o in engine.generate(EngineRequest("r", prompt, None, params))]

    outs = run(make(runtime.engine.runner, kv="dynamic"), body)
    assert outs[-1].finish_reason == "length" and sum(len(o.token_ids) for o in outs) == 3


def test_compiler_caches_by_schema_and_refuses_what_it_cannot_compile(runtime):
    hits = []
    compiler = GrammarCompiler(runtime.tokenizer, on_cache=hits.append)
    first = asyncio.run(compiler.compile(SMALL))
    again = asyncio.run(compiler.compile(json.loads(json.dumps(SMALL, sort_keys=True))))
    assert first is again and hits == [False, True]
    assert asyncio.run(compiler.compile(JSON_OBJECT)) is not first
    from service.grammar import GrammarError

    with pytest.raises(GrammarError):
        compiler.compile_now({"type": "object", "properties": {"a": {"type": "no-such-type"}}})


@pytest.fixture(scope="module")
def client(tiny, cache_dir, tmp_path_factory):
    adapters = tmp_path_factory.mktemp("structured-adapters")
    for name, enforce in (("mailer", True), ("loose", False)):
        make_lora_adapter(
            tiny.base_dir,
            adapters / name,
            fingerprint=tiny.fingerprint,
            seed=3,
            manifest={
                "prompt_template": "Product: {{ product }}\nJSON:",
                "input_fields": [{"name": "product"}],
                "output": {"format": "json", "json_schema": SMALL, "enforce": enforce},
            },
        )
    settings = tiny_settings(tiny, cache_dir, adapter_dir=adapters, guardrails="default")
    app = build_app(settings, runtime=load_runtime(settings, Metrics()))
    with TestClient(app) as c:
        yield c


def test_response_format_json_schema_on_completions_and_chat(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "small", "schema": SMALL, "strict": True}}
    r = client.post(
        "/v1/completions",
        json={
            "model": "tiny",
            "prompt": "JSON:",
            "max_tokens": 60,
            "temperature": 0.8,
            "seed": 4,
            "n": 3,
            "response_format": fmt,
        },
    )
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["text"]), SMALL)
    chat = client.post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 60,
            "temperature": 0,
            "response_format": fmt,
            "stream": True,
        },
    )
    frames = events(chat)
    text = "".join(f["choices"][0]["delta"].get("content") or "" for f in frames if f["choices"])
    jsonschema.validate(json.loads(text), SMALL)


def test_json_object_gives_an_object(client):
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 120,
            "temperature": 0,
            "response_format": {"type": "json_object"},
        },
    )
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":  # a random model may fill a string past the budget
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:
        assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith("{")


def test_json_adapters_are_enforced_unless_they_opt_out_and_text_wins(client, runtime):
    body = {"input": {"product": "lamp"}, "max_tokens": 60, "temperature": 0.9, "seed": 7}
    r = client.post("/v1/completions", json={"model": "mailer", **body}).json()
    jsonschema.validate(json.loads(r["choices"][0]["text"]), SMALL)
    assert not any(a["hook"] == "json_schema" for a in r.get("guardrails") or [])
    text = client.post("/v1/completions", json={"model": "mailer", "response_format": {"type": "text"}, **body})
    loose = client.post("/v1/completions", json={"model": "loose", **body})
    for unconstrained in (text, loose):  # a random adapter's free text is not this JSON
        assert unconstrained.status_code == 200
        with pytest.raises((ValueError, jsonschema.ValidationError)):
            jsonschema.validate(json.loads(unconstrained.json()["choices"][0]["text"]), SMALL)


@pytest.mark.parametrize(
    "fmt, fragment",
    [
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "wat"}}}},
            },
            "cannot be enforced",
        ),
        ({"type": "regex", "regex": "a+"}, "response_format"),
        ({"type": "json_schema"}, "response_format"),
        ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "response_format"),
        ({"type": "json_object", "schema": {}}, "response_format"),
    ],
)
def test_what_cannot_be_enforced_is_a_400_naming_response_format(client, fmt, fragment):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "response_format": fmt})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith("response_format") and fragment in error["message"]


def test_grammar_metrics(client):
    text = client.get("/metrics").text
    assert "hotswap_grammar_compile_seconds_count" in text
    assert 'hotswap_grammar_cache_lookups_total{result="hit"}' in text
    assert "hotswap_grammar_mask_seconds_count" in text


def test_objects_that_list_properties_are_closed_unless_they_say_otherwise():
    from service.grammar import closed_objects

    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {}}},
            "c": {"type": "array", "items": {"properties": {}}},
        },
        "$defs": {"D": {"properties": {"x": {}}, "additionalProperties": True}},
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["D"]["additionalProperties"] is True  # said so: kept
    assert "additionalProperties" not in closed_objects({"type": "object"})  # json_object: any object
    named = closed_objects({"properties": {"properties": {"type": "string"}}})  # a key named so
    assert named["properties"] == {"properties": {"type": "string"}}


@pytest.mark.parametrize("overlap", [True, False])  # the default: True on CUDA, False on CPU
def test_masks_are_computed_on_their_own_thread_during_the_forward_pass(runtime, compiler, monkeypatch, overlap):
    import threading

    from service.grammar import GrammarMatcher

    threads = []
    prefetch = GrammarMatcher.prefetch

    def recording(self):
        threads.append(threading.current_thread().name)
        prefetch(self)

    monkeypatch.setattr(GrammarMatcher, "prefetch", recording)
    grammar = compiler.compile_now(SMALL)
    prompt = tuple(runtime.tokenizer("x").input_ids)

    async def body(engine):
        params = SamplingParams(max_tokens=60, temperature=0.0, grammar=grammar)
        return [o async for o in engine.generate(EngineRequest("r", prompt, None, params))]

    outs = run(make(runtime.engine.runner, kv="dynamic", overlap_masks=overlap), body)
    assert outs[-1].finish_reason == "stop"
    # the first token's mask is made at prefill, on the engine thread; every later one during a
    # step, on the mask thread when overlapping
    assert threads[0].startswith("hotswap-engine") and threads[1:]
    later = "hotswap-grammar" if overlap else "hotswap-engine"
    assert all(name.startswith(later) for name in threads[1:])
