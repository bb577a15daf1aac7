"""vLLM's /tokenize, /detokenize and /tokenizer_info, as lm-evaluation-harness's remote tokenizer
calls them (lm_eval.utils.RemoteTokenizer, 0.4.13)."""

from __future__ import annotations

import pytest

from tests.factories import make_client
from tests.service.test_app import KEY


@pytest.fixture
def client(tiny, tokenizer):
    c, _ = make_client(tiny, tokenizer)
    with c:
        yield c


def test_tokenize_and_detokenize_round_trip_as_the_remote_tokenizer_asks(client, tokenizer):
    text = "The capital of France is Paris. 東京 😀"
    r = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    body = r.json()
    assert r.status_code == 200 and body["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 64
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": text}
    strs = client.post("/tokenize", json={"model": "alpha", "prompt": "Paris", "return_token_strs": True}).json()
    assert strs["token_strs"] == tokenizer.convert_ids_to_tokens(strs["tokens"])


def test_tokenize_messages_uses_the_chat_template(client, tokenizer):
    messages = [{"role": "user", "content": "Hi!"}]
    body = client.post("/tokenize", json={"messages": messages}).json()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert body["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(body["tokens"]).endswith("<|im_start|>assistant\n")


def test_tokenizer_info_gives_special_tokens_and_the_chat_template(client, tokenizer):
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["bos_token"] == "<|im_start|>"
    assert info["chat_template"] == tokenizer.chat_template and info["model_max_length"] == 64
    # lm-eval takes eos_token_id as the first id of encoding the eos token
    eos = client.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert eos["tokens"][0] == tokenizer.eos_token_id


@pytest.mark.parametrize(
    "path, payload, status, param",
    [
        ("/tokenize", {"model": "nosuch", "prompt": "x"}, 404, "model"),
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400, "messages"),
        ("/tokenize", {}, 400, "prompt"),
        ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens.1"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ],
)
def test_bad_tokenizer_requests_are_openai_errors(client, path, payload, status, param):
    r = client.post(path, json=payload)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_tokenizer_routes_need_the_api_key_when_keys_are_set(tiny, tokenizer):
    c, _ = make_client(tiny, tokenizer, api_keys=[KEY])
    with c:
        assert c.post("/tokenize", json={"prompt": "x"}).status_code == 401
        assert c.get("/tokenizer_info").status_code == 401
        ok = c.post("/tokenize", json={"prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
