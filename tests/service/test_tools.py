"""Tool calling (issue #31) on the tiny random Llama: whatever a random model samples, every call
parses and validates against its function's schema, in every mode, streamed or not, through
the base and an adapter; and what cannot be served is a 400 naming the field."""

from __future__ import annotations

import json

import jsonschema
import pytest
from fastapi.testclient import TestClient

from service.app import build_app
from service.fingerprint import fingerprint_files, weight_files
from service.metrics import Metrics
from service.runtime import load_runtime
from tests.conftest import TinyWorld
from tests.factories import make_lora_adapter, make_tiny_llama, tiny_settings
from tests.support import events

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
    {"type": "function", "function": {"name": "ping"}},  # no parameters: an empty object
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME, "ping": {"type": "object", "properties": {}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(cache_dir, tmp_path_factory):
    # The tiny tokenizer spells the tools' instructions in many tokens: a longer context
    root = tmp_path_factory.mktemp("tools")
    base = make_tiny_llama(root / "tiny", positions=2048)
    fingerprint = fingerprint_files(weight_files(base))
    make_lora_adapter(
        base,
        root / "adapters" / "helper",
        fingerprint=fingerprint,
        seed=5,
        manifest={"prompt_template": "Q: {{ question }}\nA:", "input_fields": [{"name": "question"}]},
    )
    settings = tiny_settings(TinyWorld(base, fingerprint, root / "adapters"), cache_dir)
    app = build_app(settings, runtime=load_runtime(settings, Metrics()))
    with TestClient(app) as c:
        yield c


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": USER, "tools": TOOLS, **body})


def check_calls(calls, names=SCHEMAS):
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), names[call["function"]["name"]])


@pytest.mark.parametrize("seed", range(4))
def test_required_calls_are_valid_whatever_a_random_model_samples(client, seed):
    r = chat(client, tool_choice="required", temperature=1.0, seed=seed, max_tokens=120, n=2)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        assert choice["message"]["content"] is None
        check_calls(choice["message"]["tool_calls"])
    assert r.json()["usage"]["completion_tokens"] > 0


def test_a_named_choice_calls_that_function_once(client):
    r = chat(client, tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=1.0, seed=1)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_time"]
    check_calls(choice["message"]["tool_calls"])


def test_parallel_tool_calls_false_gives_one_call(client):
    for seed in range(3):
        r = chat(client, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=120)
        assert len(r.json()["choices"][0]["message"]["tool_calls"]) == 1


@pytest.mark.parametrize("seed", range(6))
def test_auto_is_text_or_valid_calls(client, seed):
    r = chat(client, temperature=1.0, seed=seed, max_tokens=60)
    choice = r.json()["choices"][0]
    if choice["message"].get("tool_calls"):
        assert choice["finish_reason"] == "tool_calls"
        check_calls(choice["message"]["tool_calls"])
    else:
        assert "<tool_call>" not in choice["message"]["content"]
        assert choice["finish_reason"] in ("stop", "length")


def test_none_never_calls(client):
    r = chat(client, tool_choice="none", temperature=1.0, seed=0, max_tokens=30)
    message = r.json()["choices"][0]["message"]
    assert "tool_calls" not in message and not message["content"].startswith("<tool_call>")


def test_streamed_calls_reassemble_to_the_same_calls(client):
    body = {"tool_choice": "required", "temperature": 0.0, "max_tokens": 120}
    whole = chat(client, **body).json()["choices"][0]
    r = chat(client, stream=True, **body)
    chunks = events(r)
    assembled: dict[int, dict] = {}
    first_pieces = []
    for chunk in chunks:
        for call in chunk["choices"][0]["delta"].get("tool_calls") or []:
            if call["index"] not in assembled:
                first_pieces.append(call)
                assembled[call["index"]] = {"name": call["function"]["name"], "arguments": ""}
            assembled[call["index"]]["arguments"] += call["function"]["arguments"]
    assert all(p.get("id") and p["type"] == "function" and p["function"]["name"] for p in first_pieces)
    expected = [
        {"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in whole["message"]["tool_calls"]
    ]
    assert [assembled[i] for i in sorted(assembled)] == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_conversation_with_calls_and_results(client):
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
    ]
    r = chat(client, messages=messages, max_tokens=8)
    assert r.status_code == 200, r.text
    # /tokenize renders the conversation and its tools as chat does: the same prompt
    tokens = client.post("/tokenize", json={"model": "tiny", "messages": messages, "tools": TOOLS}).json()
    assert tokens["count"] == r.json()["usage"]["prompt_tokens"]
    without = client.post("/tokenize", json={"model": "tiny", "messages": messages}).json()
    assert without["count"] < tokens["count"]


def test_tool_calls_through_an_adapter(client):
    r = chat(client, model="helper", tool_choice="required", temperature=1.0, seed=2, max_tokens=120)
    assert r.status_code == 200, r.text
    check_calls(r.json()["choices"][0]["message"]["tool_calls"])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "code_interpreter"}]}, "tools.0.type"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name"),
        (
            {"tools": [TOOLS[0], {"type": "function", "function": {"name": "x", "parameters": {"type": "array"}}}]},
            "tools.1.function.parameters",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "x",
                            "parameters": {"type": "object", "properties": {"a": {"type": "no-such"}}},
                        },
                    }
                ]
            },
            "tools.0.function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "x", "strict": True, "parameters": WEATHER}}]},
            "tools.0.function.parameters",
        ),
        ({"messages": [*USER, {"role": "tool", "content": "x"}]}, "messages.1"),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_the_field(client, body, param):
    r = chat(client, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


# --- the Responses API -----------------------------------------------------------------------


def openai_client(client):
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client)


def test_responses_plain_and_streamed_agree(client):
    oa = openai_client(client)
    whole = oa.responses.create(model="tiny", input="Say hi", max_output_tokens=12, temperature=0)
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert whole.output[0].type == "message" and whole.output_text
    assert whole.usage.output_tokens == 12
    # a response cut by max_output_tokens ends with response.incomplete, as OpenAI's does (the
    # SDK's stream helper waits for response.completed only: read the events)
    stream = list(oa.responses.create(model="tiny", input="Say hi", max_output_tokens=12, temperature=0, stream=True))
    kinds = [event.type for event in stream]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert [e.sequence_number for e in stream] == list(range(len(stream)))
    deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == stream[-1].response.output_text


def test_responses_function_calls_plain_and_streamed(client):
    oa = openai_client(client)
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    body = dict(model="tiny", input=USER, tools=tools, tool_choice="required", temperature=0, max_output_tokens=120)
    whole = oa.responses.create(**body)
    calls = [item for item in whole.output if item.type == "function_call"]
    assert whole.status == "completed" and calls
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    with oa.responses.stream(**body) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    assert [(c.name, c.arguments) for c in final.output] == [(c.name, c.arguments) for c in calls]
    # the round trip: the call and its output as input items
    follow = oa.responses.create(
        model="tiny",
        input=[
            *USER,
            calls[0].model_dump(),
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C"},
        ],
        tools=tools,
        max_output_tokens=8,
    )
    assert follow.status in ("completed", "incomplete")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input.0.type"),
        (
            {"tool_choice": {"type": "function", "name": "nope"}, "tools": [{"type": "function", "name": "a"}]},
            "tool_choice.name",
        ),
        ({"tools": [{"type": "function", "name": "a", "parameters": {"type": "array"}}]}, "tools.0.parameters"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "no-such"}}}}, "text.format"),
    ],
)
def test_responses_errors_name_the_field(client, body, param):
    r = client.post("/v1/responses", json={"model": "tiny", "input": "hi", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


# --- closing within the budget ---------------------------------------------------------------

HARD = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "score": {"type": "number", "minimum": 3},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "inner": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "note": {"type": "string"}},
            "required": ["ok", "note"],
        },
    },
    "required": ["title", "score", "tags", "inner"],
}


def shortest(client, schema) -> int:
    """Tokens of the shortest valid output of `schema`, as the service's closing spells it."""
    from service.grammar import GrammarCompiler

    compiler = GrammarCompiler(client.app.state.hotswap.context.tokenizer)
    grammar = compiler.compile_now(schema)
    return len(compiler._closer.close(grammar.matcher()._matcher))


@pytest.mark.parametrize("extra", [0, 3, 17, 40])
def test_json_that_would_run_past_the_budget_closes_in_it(client, extra):
    budget = shortest(client, HARD) + extra
    fmt = {"type": "json_schema", "json_schema": {"name": "hard", "schema": HARD}}
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": USER,
            "response_format": fmt,
            "max_tokens": budget,
            "temperature": 1.0,
            "seed": extra,
            "n": 4,
        },
    )
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), HARD)
    assert r.json()["usage"]["completion_tokens"] <= 4 * budget


def test_a_budget_below_the_shortest_closing_is_length(client):
    budget = shortest(client, HARD) - 1
    fmt = {"type": "json_schema", "json_schema": {"name": "hard", "schema": HARD}}
    r = client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": USER, "response_format": fmt, "max_tokens": budget, "temperature": 1.0},
    )
    assert r.json()["choices"][0]["finish_reason"] == "length"
