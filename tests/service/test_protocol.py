from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.protocol import ChatCompletionRequest, CompletionRequest


def completion(**kw):
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **kw})


def error_fields(exc: ValidationError) -> set[str]:
    return {str(e["loc"][0]) if e["loc"] else "" for e in exc.errors()}


def test_defaults_follow_openai():
    req = completion()
    assert (req.max_tokens, req.n, req.temperature, req.top_p, req.echo) == (16, 1, 1.0, 1.0, False)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.5),
        ("top_p", 0.0),
        ("n", 0),
        ("n", 17),
        ("logprobs", 6),
        ("max_tokens", -1),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", ""),
        ("presence_penalty", 0.5),
        ("frequency_penalty", 1.0),
        ("logit_bias", {"1": 2.0}),
        ("best_of", 2),
        ("suffix", "tail"),
    ],
)
def test_out_of_range_values_fail_naming_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        completion(**{field: value})
    assert field in error_fields(info.value)


def test_prompt_and_input_are_exclusive():
    with pytest.raises(ValidationError, match="exactly one"):
        CompletionRequest.model_validate({"model": "m"})
    with pytest.raises(ValidationError, match="exactly one"):
        completion(input={"instruction": "x"})
    assert CompletionRequest.model_validate({"model": "m", "input": {"a": "b"}}).prompt is None


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_prompt_forms(prompt):
    assert completion(prompt=prompt).prompt == prompt


@pytest.mark.parametrize("prompt", [[], [[1], []]])
def test_empty_prompts_are_refused(prompt):
    with pytest.raises(ValidationError):
        completion(prompt=prompt)


def test_stop_string_becomes_list_and_stream_options_need_stream():
    assert completion(stop="###").stop == ["###"]
    with pytest.raises(ValidationError, match="stream_options"):
        completion(stream_options={"include_usage": True})
    assert completion(stream=True, stream_options={"include_usage": True}).include_usage


def test_chat_max_completion_tokens_wins_over_max_tokens():
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "max_completion_tokens": 9}
    )
    assert req.budget(100) == 9


def test_sampling_params_follow_one_precedence_rule():
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 7, "logprobs": True}
    )
    assert chat.budget(100) == 100  # neither field: the server's default
    params = chat.to_sampling_params(2, chat.budget(100), None)
    assert (params.max_tokens, params.seed, params.logprobs, params.prompt_logprobs) == (100, 9, 0, None)
    assert params.temperature == 1.0 and params.top_p == 1.0  # OpenAI's defaults
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "x", "echo": True, "logprobs": 2})
    assert completion.budget(100) == 16  # OpenAI's default for completions, not the server's
    params = completion.to_sampling_params(0, completion.budget(100), None)
    assert (params.seed, params.logprobs, params.prompt_logprobs) == (None, 2, 2)


def test_chat_content_parts_and_top_logprobs_rule():
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        }
    )
    assert req.messages[0].text == "ab"
    with pytest.raises(ValidationError, match="top_logprobs"):
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
        )
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})


def test_stop_strings_are_capped():
    """Security review L8: 4 x 1 MB stop strings were accepted."""
    import pydantic

    from service.protocol import MAX_STOP_CHARS, CompletionRequest

    assert CompletionRequest(model="m", prompt="x", stop=["y" * MAX_STOP_CHARS]).stop
    for stop in ("y" * (MAX_STOP_CHARS + 1), ["y" * (MAX_STOP_CHARS + 1)]):
        with pytest.raises(pydantic.ValidationError):
            CompletionRequest(model="m", prompt="x", stop=stop)
