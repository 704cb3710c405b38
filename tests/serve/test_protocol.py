"""Request checks and response shapes: pure functions, table-driven."""

from __future__ import annotations

import pytest

from peftkit.serve.limits import GREEDY_BELOW, REQUEST_LIMITS
from peftkit.serve.protocol import (
    ApiError,
    chat_chunk,
    completion_response,
    error_body,
    parse_json,
    parse_request,
    prompt_bytes,
)

BASE = {"model": "m", "prompt": "hi"}


def _parse(kind: str = "completion", **fields):
    body = {**BASE, **fields} if kind == "completion" else {"model": "m", **fields}
    return parse_request(body, kind, default_max_tokens=16, max_new_tokens=100)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 101}, "max_tokens"),
        ({"max_completion_tokens": 0}, None),  # chat's name, refused on completions
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1e-300}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"stop": 5}, "stop"),
        ({"stop": True}, "stop"),
        ({"stop": {"x": 1}}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": "x" * 257}, "stop"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"n": 2}, "n"),
        ({"logprobs": 3}, "logprobs"),
        ({"logprobs": 0}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"stream": "yes"}, "stream"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"user": 5}, "user"),
    ],
)
def test_out_of_range_or_unsupported_fields_are_400_naming_the_field(fields, param) -> None:
    with pytest.raises(ApiError) as caught:
        _parse(**fields)
    assert caught.value.status == 400
    assert caught.value.param == (param or "max_completion_tokens")


def test_the_limits_and_no_op_values_are_accepted() -> None:
    parsed = _parse(temperature=1e-30, top_p=1e-6, seed=2**63 - 1, stop=["a", "b", "c", "d"], max_tokens=1,
                    logprobs=False, tools=[], n=1, echo=False, user="u")  # fmt: skip
    assert parsed.params.temperature < GREEDY_BELOW and parsed.params.seed == 2**63 - 1
    assert parsed.params.stop == ("a", "b", "c", "d") and parsed.params.max_tokens == 1
    assert _parse().params.max_tokens == 16  # the default
    chat = _parse(
        "chat", messages=[{"role": "user", "content": "hey"}], max_completion_tokens=3, tool_choice="none"
    )
    assert chat.params.max_tokens == 3 and chat.prompt == [{"role": "user", "content": "hey"}]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"model": "m", "prompt": "\xff"}', "not valid UTF-8"),
        (b'{"model": "m", "prompt": "x\\ud800y"}', "not valid Unicode"),
        (b'{"model": "m", "x\\udfff": 1}', "not valid Unicode"),
        (b"[" * 100_000, "nests deeper"),
        (b'{"a": ' + b"[" * 32 + b"1" + b"]" * 32 + b"}", "nests deeper"),  # 33 levels
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
    ],
)
def test_bodies_that_are_not_sound_json_are_400(raw: bytes, reason: str) -> None:
    with pytest.raises(ApiError, match=reason) as caught:
        parse_json(raw)
    assert caught.value.status == 400


def test_a_sound_body_parses_and_prompt_bytes_count_utf8() -> None:
    body = parse_json('{"model": "m", "prompt": "héllo 🎉"}'.encode())
    assert body["prompt"] == "héllo 🎉"
    parsed = parse_request(body, "completion", 16, 100)
    assert prompt_bytes(parsed) == len("héllo 🎉".encode())


def test_response_shapes_are_openais() -> None:
    assert error_body(429, "busy")["error"] == {
        "message": "busy",
        "type": "rate_limit_error",
        "param": None,
        "code": 429,
    }
    assert error_body(500, "x")["error"]["type"] == "server_error"
    whole = completion_response(
        "cmpl-1", "m", "text", "stop", {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    )
    assert whole["object"] == "text_completion" and whole["choices"][0] == {
        "index": 0,
        "text": "text",
        "logprobs": None,
        "finish_reason": "stop",
    }
    chunk = chat_chunk("c-1", "m", {"content": "a"}, None)
    assert (
        chunk["object"] == "chat.completion.chunk"
        and chunk["choices"][0]["delta"] == {"content": "a"}
        and "usage" not in chunk
    )


def test_the_limits_text_names_each_checked_limit() -> None:
    words = ["temperature 0-2", "below 1e-05: greedy", "top_p 1e-06-1", "[-2^63, 2^63-1]",
             "max_tokens at least 1", "up to 4 strings of 1-256 characters", "non-empty prompt",
             "nested at most 32 deep"]  # fmt: skip
    assert [w for w in words if w not in REQUEST_LIMITS] == []
