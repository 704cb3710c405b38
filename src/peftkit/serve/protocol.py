"""OpenAI's request and response shapes: parsing a body into a request, building the JSON answers.

Pure functions over dicts; :mod:`peftkit.serve.api` does the HTTP. A field the server does not
implement is refused (400) rather than ignored, except where it is given at its no-op value
(``n: 1``, ``presence_penalty: 0``…), which some clients always send.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from peftkit.serve.sampling import SamplingParams

__all__ = [
    "ApiError",
    "ParsedRequest",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "error_body",
    "parse_request",
]

_COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop", "seed", "user"}
_FIELDS = {"chat": _COMMON | {"messages", "max_completion_tokens"}, "completion": _COMMON | {"prompt"}}
# Fields accepted only at the value that changes nothing.
_NO_OP = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": None,
    "top_logprobs": None,
    "echo": False,
    "best_of": 1,
    "logit_bias": None,
    "suffix": None,
    "tools": None,
    "tool_choice": None,
    "response_format": None,
    "parallel_tool_calls": None,
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class ApiError(Exception):
    """An error answer: HTTP ``status``, a message, and the request field it is about (if any)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


@dataclass(frozen=True)
class ParsedRequest:
    """A checked request: the ``model`` name as sent, what to feed the model, sampling, streaming."""

    model: str
    prompt: str | list[dict[str, Any]]  # completions: the text; chat: the messages
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_request(body: Any, kind: str, default_max_tokens: int, max_new_tokens: int) -> ParsedRequest:
    """Check a ``/v1/chat/completions`` (``kind="chat"``) or ``/v1/completions`` body.

    Args:
        body: the decoded JSON.
        default_max_tokens: ``max_tokens`` when the body has none.
        max_new_tokens: the server's limit on ``max_tokens``.

    Raises:
        ApiError: 400 naming the field: unknown or unsupported, of the wrong type, or out of range.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key, value in body.items():
        if key in _FIELDS[kind]:
            continue
        if key in _NO_OP and value == _NO_OP[key]:
            continue
        if key in _NO_OP:
            raise ApiError(
                400, f"{key}={value!r} is not supported by this server (only {_NO_OP[key]!r})", key
            )
        raise ApiError(400, f"unsupported field {key!r}", key)
    model = _typed(body, "model", str, required=True)
    if kind == "chat":
        prompt: Any = _messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string (one prompt per request)", "prompt")
    limit_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _typed(body, limit_key, int) or default_max_tokens
    if not 1 <= max_tokens <= max_new_tokens:
        raise ApiError(400, f"{limit_key}={max_tokens} must be between 1 and {max_new_tokens}", limit_key)
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature={temperature} must be between 0 and 2", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p={top_p} must be in (0, 1]", "top_p")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else stop
    if stops is not None and (len(stops) > 4 or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
    stream = bool(_typed(body, "stream", bool))
    options = _typed(body, "stream_options", dict) or {}
    if set(options) - {"include_usage"}:
        raise ApiError(
            400, f"stream_options supports include_usage only, got {sorted(options)}", "stream_options"
        )
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=_typed(body, "seed", int),
        stop=stops or (),
    )
    return ParsedRequest(model, prompt, params, stream, bool(options.get("include_usage")))


def _typed(body: dict[str, Any], key: str, kind: type, required: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        if required:
            raise ApiError(400, f"{key!r} is required", key)
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, f"{key} must be a {kind.__name__}, got {value!r}", key)
    return value


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{key} must be a number, got {value!r}", key)
    return float(value)


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    checked = []
    for message in messages:
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"}:
            raise ApiError(400, "each message is {'role': ..., 'content': ...}", "messages")
        role, content = message.get("role"), message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, "message content parts must be of type 'text'", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ApiError(
                400,
                f"a message needs role system/user/assistant and text content, got {message!r}",
                "messages",
            )
        checked.append({"role": role, "content": content})
    return checked


def new_id(prefix: str) -> str:
    """A fresh response id such as ``chatcmpl-3f2a…``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_response(id_: str, model: str, text: str, finish_reason: str, use: dict[str, int]) -> dict[str, Any]:
    """A whole ``chat.completion``."""
    message = {"role": "assistant", "content": text}
    return _envelope(
        id_, "chat.completion", model, [_choice(message=message, finish_reason=finish_reason)], use
    )


def chat_chunk(
    id_: str, model: str, delta: dict[str, str], finish_reason: str | None, use: dict[str, int] | None = None
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` of a stream (``choices`` empty for the closing usage chunk)."""
    choices = [] if use is not None else [_choice(delta=delta, finish_reason=finish_reason)]
    return _envelope(id_, "chat.completion.chunk", model, choices, use)


def completion_response(
    id_: str, model: str, text: str, finish_reason: str, use: dict[str, int]
) -> dict[str, Any]:
    """A whole ``text_completion``."""
    choice = _choice(text=text, logprobs=None, finish_reason=finish_reason)
    return _envelope(id_, "text_completion", model, [choice], use)


def completion_chunk(
    id_: str, model: str, text: str, finish_reason: str | None, use: dict[str, int] | None = None
) -> dict[str, Any]:
    """One streamed ``text_completion`` piece (``choices`` empty for the closing usage chunk)."""
    choices = [] if use is not None else [_choice(text=text, logprobs=None, finish_reason=finish_reason)]
    return _envelope(id_, "text_completion", model, choices, use)


def _choice(**fields: Any) -> dict[str, Any]:
    """The only choice of a response (``n`` is 1): index 0 and ``fields``."""
    return {"index": 0, **fields}


def _envelope(
    id_: str, kind: str, model: str, choices: list[dict[str, Any]], use: dict[str, int] | None
) -> dict[str, Any]:
    """OpenAI's response object around ``choices``; ``usage`` only when given (streams end with it)."""
    body: dict[str, Any] = {"id": id_, "object": kind, "created": int(time.time()), "model": model}
    body["choices"] = choices
    if use is not None:
        body["usage"] = use
    return body
