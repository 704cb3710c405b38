"""``/v1/completions`` and ``/v1/chat/completions``: check, tokenize, queue, relay the engine's events.

Checking and tokenizing run on a small thread pool, not on the event loop: a long prompt delays its
own answer only (its size in bytes is bounded before it is tokenized). The engine's events arrive on
its thread and are passed into an asyncio queue; a plain answer gathers them, a stream sends each as a
server-sent event. Whatever ends a request — its answer, an error (a JSON error before a stream
starts; an error event, then ``[DONE]``, after), its client leaving, the server shutting down — the
engine hears of it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from peftkit.serve.engine import Engine, QueueFull, ServerDraining
from peftkit.serve.limits import ServeLimits
from peftkit.serve.protocol import (
    ApiError,
    ParsedRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    new_id,
    parse_json,
    parse_request,
    prompt_bytes,
    usage,
)
from peftkit.serve.rows import Event, GenerationRequest

__all__ = ["Completions"]

_DISCONNECT_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class _Prepared:
    parsed: ParsedRequest
    adapter: str | None
    prompt_ids: list[int]


class Completions:
    """The two generation endpoints over ``engine``.

    Args:
        engine: the scheduler (with its host's tokenizer and its bank's adapter names).
        base_name: the ``model`` name that means the base model alone.
        limits: request limits.
        executor: where checking and tokenizing run.
    """

    def __init__(self, engine: Engine, base_name: str, limits: ServeLimits, executor: Executor) -> None:
        self.engine, self.base_name, self.limits, self.executor = engine, base_name, limits, executor
        self.metrics = engine.metrics

    async def answer(self, http: Request, raw: bytes, kind: str) -> Response:
        """The response to a generation request whose body is ``raw``.

        Raises:
            ApiError: the request is refused before anything runs (4xx, or 429/503 when busy).
        """
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self.executor, self._prepare, raw, kind)
        events: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(event: Event) -> None:  # on the engine thread
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is gone
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = GenerationRequest(prepared.prompt_ids, prepared.adapter, prepared.parsed.params, on_event)
        try:
            self.engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry later") from e
        except ServerDraining as e:
            raise ApiError(503, f"{e}; retry later") from e
        id_ = new_id("chatcmpl" if kind == "chat" else "cmpl")
        if prepared.parsed.stream:  # Starlette cancels the stream (and so the request) when the client leaves
            return StreamingResponse(
                self._stream(job, events, id_, kind, prepared.parsed),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return await self._gather(http, job, events, id_, kind, prepared.parsed)

    def _prepare(self, raw: bytes, kind: str) -> _Prepared:
        """Check the body and tokenize the prompt (on the executor)."""
        limits = self.limits
        default = limits.max_new_tokens if kind == "chat" else min(16, limits.max_new_tokens)
        parsed = parse_request(parse_json(raw), kind, default, limits.max_new_tokens)
        if parsed.model == self.base_name:
            adapter = None
        elif parsed.model in self.engine.bank.names():
            adapter = parsed.model
        else:
            raise ApiError(404, f"The model `{parsed.model}` does not exist.", "model")
        size = prompt_bytes(parsed)
        if size > limits.max_prompt_bytes:
            raise ApiError(400, f"the prompt is {size} bytes, above the limit of {limits.max_prompt_bytes}")
        prompt_ids = _encode(self.engine.host.tokenizer, parsed, kind)
        max_length = self.engine.host.max_length
        longest = min(limits.max_prompt_tokens, (max_length or limits.max_prompt_tokens + 1) - 1)
        if len(prompt_ids) > longest:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens, above the limit of {longest}")
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty once tokenized", "prompt")
        return _Prepared(parsed, adapter, prompt_ids)

    async def _gather(
        self,
        http: Request,
        job: GenerationRequest,
        events: asyncio.Queue[Event],
        id_: str,
        kind: str,
        parsed: ParsedRequest,
    ) -> Response:
        text: list[str] = []
        event = Event()
        try:
            while not event.final:
                try:
                    event = await asyncio.wait_for(events.get(), _DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:  # nothing reads the client's side meanwhile: look
                    if await http.is_disconnected():
                        return Response(status_code=499)
                    continue
                text.append(event.text)
        finally:
            if not event.final:  # the client left
                self.engine.cancel(job)
        if event.error is not None:
            raise ApiError(event.status, event.error)
        use = usage(event.prompt_tokens, event.completion_tokens)
        build = chat_response if kind == "chat" else completion_response
        return JSONResponse(build(id_, parsed.model, "".join(text), event.finish_reason or "stop", use))

    async def _stream(
        self, job: GenerationRequest, events: asyncio.Queue[Event], id_: str, kind: str, parsed: ParsedRequest
    ) -> AsyncIterator[str]:
        finished = False
        try:
            if kind == "chat":
                yield _sse(chat_chunk(id_, parsed.model, {"role": "assistant", "content": ""}, None))
            while not finished:
                event = await events.get()
                finished = event.final
                if event.error is not None:
                    self.metrics.failed_streams.labels(_reason(event)).inc()
                    yield _sse(error_body(event.status, event.error))
                    break
                if event.text or event.final:
                    yield _sse(_chunk(kind, id_, parsed.model, event.text, event.finish_reason))
                if event.final and parsed.include_usage:
                    use = usage(event.prompt_tokens, event.completion_tokens)
                    yield _sse(_chunk(kind, id_, parsed.model, "", None, use))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away: free the slot
                self.engine.cancel(job)


def _chunk(
    kind: str, id_: str, model: str, text: str, finish: str | None, use: dict[str, int] | None = None
) -> dict:
    if kind == "chat":
        return chat_chunk(id_, model, {"content": text} if text else {}, finish, use)
    return completion_chunk(id_, model, text, finish, use)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _reason(event: Event) -> str:
    """A failed stream's reason label: shutdown, adapter, or generation."""
    if event.status == 503:
        return "shutdown"
    return "adapter" if event.status < 500 else "generation"


def _encode(tokenizer: Any, parsed: ParsedRequest, kind: str) -> list[int]:
    """The prompt's token ids: chat messages through the tokenizer's chat template, text as is."""
    if kind == "completion":
        return list(tokenizer(parsed.prompt).input_ids)
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "the served model's tokenizer has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(parsed.prompt, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)
