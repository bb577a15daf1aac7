"""End to end, issue #31: tool calls and the Responses API on the real server (SmolLM2, nf4, as
`make serve`), through the agent clients people use: openai-python, pydantic-ai, LangChain and
the openai-agents SDK. SmolLM2's template knows no tools: the generic format serves it."""

from __future__ import annotations

# The clients are imported here, at collection, on the main thread with no other thread alive: an
# import inside a test once failed CI with CPython 3.11's "SystemError: AST constructor recursion
# depth mismatch" (cpython gh-106905, a race on the interpreter-wide AST state when two threads
# parse at once; pytest parses what it rewrites, and anyio's lazy imports ran into it).
import asyncio
import json

import agents
import jsonschema
import openai
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from tests.test_e2e import BASE, adapter_dir, serving  # noqa: F401  (adapter_dir: a fixture)

pytestmark = pytest.mark.e2e

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather of a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time now"}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": {"type": "object", "properties": {}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, cache_dir, adapter_dir):  # noqa: F811
    service, log = serving(tmp_path_factory, cache_dir, adapter_dir)
    with service as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def valid(calls) -> list[tuple[str, dict]]:
    out = []
    for call in calls:
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


@pytest.mark.parametrize("model", [BASE, "dolly", "schema"])
def test_required_and_named_calls_validate_on_the_base_and_both_adapters(client, model):
    messages = ASK
    if model == "schema":  # its input fields, as JSON in the user message
        messages = [{"role": "user", "content": json.dumps({"product": "Umbrella", "description": "For Paris rain"})}]
    for choice, seed in (("required", 1), ({"type": "function", "function": {"name": "get_weather"}}, 2)):
        r = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, tool_choice=choice, temperature=0.8, seed=seed, max_tokens=64
        )
        assert r.choices[0].finish_reason == "tool_calls", r
        calls = valid(r.choices[0].message.tool_calls)
        if isinstance(choice, dict):
            assert [name for name, _ in calls] == ["get_weather"]


def test_auto_streamed_and_a_round_trip_with_the_result(client):
    r = client.chat.completions.create(
        model=BASE, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=96
    )
    call = r.choices[0].message.tool_calls[0]
    stream = client.chat.completions.create(
        model=BASE, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, stream=True, max_tokens=96
    )
    pieces = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
    first = pieces[0][0]
    assert first.id and first.function.name == call.function.name
    assert "".join(p.function.arguments or "" for d in pieces for p in d if p.index == 0) == call.function.arguments
    # the tool's result goes back; auto may answer in text or call again, valid either way
    follow = client.chat.completions.create(
        model=BASE,
        messages=[
            *ASK,
            r.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"},
        ],
        tools=TOOLS,
        temperature=0,
        max_tokens=40,
    )
    message = follow.choices[0].message
    assert message.tool_calls is None or valid(message.tool_calls)
    assert message.tool_calls or message.content


def test_responses_plain_and_streamed(client):
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    ask = {"model": BASE, "input": "What is the weather in Paris?", "tools": tools, "tool_choice": "required"}
    whole = client.responses.create(**ask, temperature=0, max_output_tokens=96)
    calls = [item for item in whole.output if item.type == "function_call"]
    assert whole.status == "completed" and calls
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    with client.responses.stream(**ask, temperature=0, max_output_tokens=96) as stream:
        final = stream.get_final_response()
    assert [(c.name, c.arguments) for c in final.output] == [(c.name, c.arguments) for c in calls]
    text = client.responses.create(model=BASE, instructions="Answer briefly.", input="Hi!", max_output_tokens=16)
    assert text.output_text and text.usage.output_tokens <= 16


class City(BaseModel):
    name: str
    country: str


def test_pydantic_ai_agent_with_a_tool_and_an_output_type(server):
    model = OpenAIChatModel(BASE, provider=OpenAIProvider(base_url=f"{server}/v1", api_key="unused"))
    agent = Agent(model, output_type=City, instructions="Find the capital, then give it as the result.")
    called = []

    async def once(ctx, definition):  # the tool is offered until it has been called
        return None if called else definition

    @agent.tool_plain(prepare=once)
    def capital_of(country: str) -> str:
        """The capital city of a country."""
        called.append(country)
        return "Paris"

    result = agent.run_sync("What is the capital of France?", model_settings={"temperature": 0, "max_tokens": 64})
    assert called and isinstance(result.output, City)


def test_langchain_bind_tools_and_structured_output_by_function_calling(server):
    @tool
    def get_weather(city: str) -> str:
        """Weather of a city."""
        return "sunny"

    chat = ChatOpenAI(model=BASE, base_url=f"{server}/v1", api_key="unused", temperature=0, max_tokens=64)
    message = chat.bind_tools([get_weather], tool_choice="required").invoke("What is the weather in Paris?")
    assert message.tool_calls and all(
        c["name"] == "get_weather" and isinstance(c["args"]["city"], str) for c in message.tool_calls
    )
    city = chat.with_structured_output(City, method="function_calling").invoke("Paris is in France. Extract the city.")
    assert isinstance(city, City)


def test_openai_agents_sdk_on_the_responses_api(server):
    agents.set_tracing_disabled(True)  # its traces go to OpenAI's servers

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather of a city."""
        return f"18 C and sunny in {city}"

    agent = agents.Agent(
        name="weather",
        instructions="Use the tool.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(
            model=BASE, openai_client=openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused")
        ),
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=64),
        tool_use_behavior="stop_on_first_tool",
    )
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?", max_turns=2))
    assert result.final_output.startswith("18 C and sunny in")
