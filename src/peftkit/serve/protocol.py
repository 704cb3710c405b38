"""OpenAI's request and response shapes: checking a body into a request, building the JSON answers.

Pure functions; :mod:`peftkit.serve.api` does the HTTP. Every limit a request must keep is checked
here, up front, in one place (:data:`~peftkit.serve.limits.REQUEST_LIMITS` says them in words), so
what reaches the engine cannot fail it. A field the server does not implement is refused (400) rather
than ignored, except at its no-op value (``n: 1``, ``logprobs: false``, ``tools: []``…), which some
clients always send.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from peftkit.serve.limits import MAX_JSON_DEPTH, MAX_STOP_CHARS, MAX_STOPS, SEED_RANGE, TOP_P_MIN
from peftkit.serve.sampling import SamplingParams

__all__ = [
    "ApiError",
    "ParsedRequest",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "error_body",
    "parse_json",
    "parse_request",
    "prompt_bytes",
    "usage",
]

_COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop", "seed", "user"}
_FIELDS = {"chat": _COMMON | {"messages", "max_completion_tokens"}, "completion": _COMMON | {"prompt"}}
# Fields accepted only at a value that changes nothing (compared with their type: 0 is not False).
_NO_OP: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (False,),
    "best_of": (1,),
    "logit_bias": (None, {}),
    "suffix": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None,),
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


def parse_json(raw: bytes) -> dict[str, Any]:
    """A request body: UTF-8 JSON, an object, nested at most :data:`MAX_JSON_DEPTH` deep, every string
    encodable (no lone surrogates such as ``"\\ud800"``).

    Raises:
        ApiError: 400 saying which.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"the request body is not valid UTF-8: {error}") from error
    try:
        body = json.loads(text)
    except RecursionError as error:
        raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from error
    except json.JSONDecodeError as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from error
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    pending: list[tuple[Any, int]] = [(body, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            pending += [(key, depth) for key in value] + [(item, depth + 1) for item in value.values()]
        elif isinstance(value, list):
            pending += [(item, depth + 1) for item in value]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ApiError(
                    400, f"the request body holds a string that is not valid Unicode ({error.reason})"
                ) from error
    return body


def parse_request(
    body: dict[str, Any], kind: str, default_max_tokens: int, max_new_tokens: int
) -> ParsedRequest:
    """Check a ``/v1/chat/completions`` (``kind="chat"``) or ``/v1/completions`` body (see
    :data:`~peftkit.serve.limits.REQUEST_LIMITS`).

    Args:
        body: the decoded JSON object (:func:`parse_json`).
        default_max_tokens: ``max_tokens`` when the body has none.
        max_new_tokens: the server's limit on ``max_tokens``.

    Raises:
        ApiError: 400 naming the field: unknown or unsupported, of the wrong type, or out of range.
    """
    _check_fields(body, kind)
    model = _typed(body, "model", str, required=True)
    prompt = _messages(body.get("messages")) if kind == "chat" else _prompt(body.get("prompt"))
    limit_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _typed(body, limit_key, int)
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= max_new_tokens:
        raise ApiError(400, f"{limit_key}={max_tokens} must be between 1 and {max_new_tokens}", limit_key)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, TOP_P_MIN, 1.0)
    seed = _typed(body, "seed", int)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ApiError(400, f"seed={seed} must be an integer in [-2^63, 2^63-1]", "seed")
    stream = bool(_typed(body, "stream", bool))
    options = _typed(body, "stream_options", dict) or {}
    if set(options) - {"include_usage"}:
        raise ApiError(
            400, f"stream_options supports include_usage only, got {sorted(options)}", "stream_options"
        )
    _typed(body, "user", str)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=_stops(body.get("stop"))
    )
    return ParsedRequest(model, prompt, params, stream, bool(options.get("include_usage")))


def prompt_bytes(parsed: ParsedRequest) -> int:
    """The UTF-8 size of what will be tokenized (the prompt, or the messages' contents)."""
    if isinstance(parsed.prompt, str):
        return len(parsed.prompt.encode("utf-8"))
    return sum(len(message["content"].encode("utf-8")) for message in parsed.prompt)


def _check_fields(body: dict[str, Any], kind: str) -> None:
    for key, value in body.items():
        if key in _FIELDS[kind]:
            continue
        allowed = _NO_OP.get(key)
        if allowed is None:
            raise ApiError(400, f"unsupported field {key!r}", key)
        if not any(type(value) is type(no_op) and value == no_op for no_op in allowed):
            shown = " or ".join(json.dumps(no_op) for no_op in allowed)
            raise ApiError(400, f"{key}={value!r} is not supported by this server (only {shown})", key)


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (one prompt per request)", "prompt")
    if not prompt:
        raise ApiError(400, "prompt must not be empty", "prompt")
    return prompt


def _stops(stop: Any) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else stop
    if stops is None:
        return ()
    if (
        not isinstance(stops, tuple)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise ApiError(
            400,
            f"stop must be a string or a list of up to {MAX_STOPS} strings of 1-{MAX_STOP_CHARS} characters",
            "stop",
        )
    return stops


def _typed(body: dict[str, Any], key: str, kind: type, required: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        if required:
            raise ApiError(400, f"{key!r} is required", key)
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, f"{key} must be a {kind.__name__}, got {value!r}", key)
    return value


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{key} must be a number, got {value!r}", key)
    if not (math.isfinite(value) and low <= value <= high):
        raise ApiError(400, f"{key}={value} must be between {low:g} and {high:g}", key)
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
