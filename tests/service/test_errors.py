"""No 500 on malformed input, and no internals in a 500: request ids, generic messages, budgets."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from service.engine import EngineOutput
from service.errors import StepFailed
from tests.factories import make_client
from tests.service.fakes import ScriptedEngine
from tests.support import events

SECRET = "The size of tensor a (168) must match the size of tensor b (12)"


class FailingEngine(ScriptedEngine):
    """Fails every generation the way a broken model step does, after `tokens` tokens."""

    def __init__(self, scripted_tokenizer, tokens: int = 0):
        super().__init__(scripted_tokenizer)
        self.tokens = tokens

    async def generate(self, request):
        self.requests.append(request)
        for token in self.script_ids[: self.tokens]:
            yield EngineOutput((token,))
        raise StepFailed(f"generation failed: RuntimeError: {SECRET}")


@pytest.mark.parametrize(
    "payload, param",
    [
        ({"model": "tiny", "prompt": "\ud800"}, "prompt"),
        ({"model": "tiny", "prompt": ["ok", "bad \udfff"]}, "prompt.1"),
        ({"model": "tiny", "prompt": "ok", "stop": ["\ud83d"]}, "stop.0"),
        ({"model": "alpha", "input": {"instruction": "x\ud800y"}}, "input.instruction"),
        ({"model": "tiny", "prompt": "ok", "user": "\udc00"}, "user"),
    ],
)
def test_lone_surrogates_are_a_400_naming_the_field(tiny, tokenizer, payload, param):
    c, engine = make_client(tiny, tokenizer)
    with c:
        # json.dumps keeps the surrogate as the escape "\ud800", as a client would send it
        r = c.post("/v1/completions", content=json.dumps(payload), headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param and "surrogate" in r.json()["error"]["message"]
        chat = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}]}
        r = c.post("/v1/chat/completions", content=json.dumps(chat), headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.0.text"
    assert engine.requests == []


def test_every_response_carries_a_request_id_and_a_client_id_is_kept(tiny, tokenizer):
    c, _ = make_client(tiny, tokenizer, max_request_bytes=2048)
    with c:
        responses = [
            c.get("/health"),
            c.get("/v1/models"),
            c.get("/v1/nosuch"),
            c.post("/v1/completions", json={"model": "nosuch", "prompt": "x"}),
            c.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 4096}),
            c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "stream": True}),
        ]
        ids = [r.headers.get("x-request-id") for r in responses]
        assert [r.status_code for r in responses] == [200, 200, 404, 404, 413, 200]
        assert all(ids) and len(set(ids)) == len(ids)
        kept = c.get("/health", headers={"X-Request-Id": "gateway-trace.42"})
        assert kept.headers["x-request-id"] == "gateway-trace.42"
        replaced = c.get("/health", headers={"X-Request-Id": "no spaces\tor tabs"})
        assert replaced.headers["x-request-id"] != "no spaces\tor tabs"


def test_a_failed_generation_is_a_500_with_the_id_and_never_the_exception(tiny, tokenizer, caplog):
    c, _ = make_client(tiny, tokenizer, engine=FailingEngine(tokenizer))
    with c, caplog.at_level(logging.ERROR):
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 500
        request_id = r.headers["x-request-id"]
        error = r.json()["error"]
        assert error["type"] == "server_error" and request_id in error["message"]
        assert "RuntimeError" not in r.text and "tensor" not in r.text
        # the cause is in the log, under the same id
        assert any(request_id in rec.getMessage() and SECRET in rec.getMessage() for rec in caplog.records)


def test_a_stream_that_fails_midway_ends_with_a_generic_error_event(tiny, tokenizer):
    c, _ = make_client(tiny, tokenizer, engine=FailingEngine(tokenizer, tokens=2))
    with c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 200
        last = events(r)[-1]
        assert last["error"]["type"] == "server_error"
        assert r.headers["x-request-id"] in last["error"]["message"] and "tensor" not in r.text


def test_an_unexpected_exception_is_a_generic_500_with_the_id(tiny, tokenizer, monkeypatch):
    from service.serving.completions import CompletionServing

    def broken(self, request, target):
        raise TypeError(SECRET)

    monkeypatch.setattr(CompletionServing, "prompts", broken)
    c, _ = make_client(tiny, tokenizer)
    with TestClient(c.app, raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 500 and "TypeError" not in r.text and "tensor" not in r.text
        assert r.headers["x-request-id"] in r.json()["error"]["message"]


def test_chat_without_a_budget_gets_default_max_tokens(tiny, tokenizer):
    c, engine = make_client(tiny, tokenizer, default_max_tokens=7)
    with c:
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
        assert c.post("/v1/chat/completions", json={**chat, "max_tokens": 30}).status_code == 200
    assert [r.params.max_tokens for r in engine.requests] == [7, 30]
    c, engine = make_client(tiny, tokenizer, default_max_tokens=0)  # 0: up to the context
    with c:
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
    assert engine.requests[0].params.max_tokens == 64 - len(engine.requests[0].prompt_ids)
