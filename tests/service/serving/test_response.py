"""The generation pipeline (service/serving/response.py) without HTTP: a ServingContext over a
scripted engine, driven through both endpoints' serving classes."""

from __future__ import annotations

import asyncio
import json

import pytest

from service.adapters.registry import AdapterRegistry
from service.metrics import Metrics
from service.protocol import ChatCompletionRequest, CompletionRequest
from service.serving.chat import ChatServing
from service.serving.completions import CompletionServing
from service.serving.context import ServingContext
from tests.service.fakes import ScriptedEngine

SCRIPT = " Paris is the capital."


@pytest.fixture
def ctx(tiny, tokenizer):
    registry = AdapterRegistry(tiny.adapter_dir, base_id="tiny", base_fingerprint=tiny.fingerprint)
    registry.scan()
    engine = ScriptedEngine(tokenizer, SCRIPT)
    return ServingContext(engine, tokenizer, registry, "tiny", max_context=64, metrics=Metrics(), default_max_tokens=5)


def create(serving, request, targets=None):
    async def main():
        result = await serving.create(request, targets.append if targets is not None else lambda target: None)
        if request.stream:
            return [frame async for frame in result]
        return result

    return asyncio.run(main())


def test_every_prompt_gets_n_choices_and_usage_counts_each_prompt_once(ctx, tokenizer):
    request = CompletionRequest(model="tiny", adapter="alpha", prompt=["one two", "three"], n=2, max_tokens=50, seed=3)
    targets = []
    response = create(CompletionServing(ctx), request, targets)
    assert [t.label for t in targets] == ["alpha"]  # told once, before anything runs
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert {c.text for c in response.choices} == {SCRIPT}
    prompts = [tokenizer(p).input_ids for p in request.prompt]
    assert response.usage.prompt_tokens == sum(map(len, prompts))
    completion = len(tokenizer(SCRIPT, add_special_tokens=False).input_ids)
    assert response.usage.completion_tokens == 4 * completion
    # choice i of prompt p: prompt p's ids, seed + i across the whole request, the adapter's name
    sent = sorted(ctx.engine.requests, key=lambda r: r.params.seed)
    assert [list(r.prompt_ids) for r in sent] == [prompts[0], prompts[0], prompts[1], prompts[1]]
    assert [r.params.seed for r in sent] == [3, 4, 5, 6]
    assert {r.adapter for r in sent} == {"alpha"}


def test_a_streamed_chat_opens_each_choice_then_carries_the_same_text_as_a_collected_one(ctx):
    fields = {"model": "tiny", "messages": [{"role": "user", "content": "Capital of France?"}], "n": 2}
    collected = create(ChatServing(ctx), ChatCompletionRequest(**fields))
    texts = [c.message.content for c in collected.choices]
    assert texts[0] and texts[0] == texts[1] and SCRIPT.startswith(texts[0])  # the default budget cuts it
    frames = create(
        ChatServing(ctx), ChatCompletionRequest(**fields, stream=True, stream_options={"include_usage": True})
    )
    chunks = [json.loads(f[len("data: ") :]) for f in frames if f != "data: [DONE]\n\n"]
    assert frames[-1] == "data: [DONE]\n\n"
    openings = chunks[:2]
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"]["role"]) for c in openings] == [
        (0, "assistant"),
        (1, "assistant"),
    ]
    texts = {0: "", 1: ""}
    for chunk in chunks[2:-1]:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
    assert texts == {c.index: c.message.content for c in collected.choices}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == collected.usage.model_dump()


def test_a_chat_without_a_budget_gets_the_servers_default(ctx):
    request = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "hi"}])
    response = create(ChatServing(ctx), request)
    assert ctx.engine.requests[0].params.max_tokens == 5  # DEFAULT_MAX_TOKENS, not OpenAI's none
    assert response.choices[0].finish_reason == "length"
