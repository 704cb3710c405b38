"""The FastAPI app: OpenAI's completions, chat completions and models, vLLM's adapter loading, health,
metrics. The model runs on the engine's thread; handlers only parse, queue, and relay its events."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from peftkit.serve.adapters import AdapterError
from peftkit.serve.engine import Engine, Event, GenerationRequest, QueueFull
from peftkit.serve.protocol import (
    ApiError,
    ParsedRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    new_id,
    parse_request,
    usage,
)

__all__ = ["ServeLimits", "create_app"]

_ROUTES = {
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
}

_DISCONNECT_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for, and the key it must bring.

    Attributes:
        api_key: the key clients send as ``Authorization: Bearer KEY``; None: no key needed.
        max_prompt_tokens: the longest prompt, in tokens, after the chat template.
        max_new_tokens: the largest ``max_tokens``; also chat's default.
        max_body_bytes: the largest request body.
        retry_after_seconds: the ``Retry-After`` of a 429/503 answer.
    """

    api_key: str | None = None
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 512
    max_body_bytes: int = 1 << 20
    retry_after_seconds: int = 1


def create_app(engine: Engine, base_name: str, limits: ServeLimits) -> FastAPI:
    """The app for ``engine``; starting it (its lifespan) starts the engine, stopping it stops the engine.

    Args:
        engine: the scheduler, with its registry, tokenizer and metrics.
        base_name: the ``model`` name that means the base model alone.
        limits: request limits and the API key.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="peftkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    registry, tokenizer, metrics = engine.registry, engine.tokenizer, engine.metrics
    app.add_middleware(_Guard, limits=limits, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, str(exc), limits, exc.param)

    @app.exception_handler(AdapterError)
    async def adapter_error(_: Request, exc: AdapterError) -> JSONResponse:
        return _error(exc.status, str(exc), limits)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", limits)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        entry = {"object": "model", "created": created, "owned_by": "peftkit"}
        data = [{"id": base_name, **entry, "root": base_name, "parent": None}]
        data += [{"id": name, **entry, "root": name, "parent": base_name} for name in list(registry.records)]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        body = await _json(request, limits)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise ApiError(400, "lora_name and lora_path (strings) are required")
        await run_in_threadpool(registry.register, name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> PlainTextResponse:
        body = await _json(request, limits)
        name = body.get("lora_name")
        if not isinstance(name, str):
            raise ApiError(400, "lora_name (a string) is required", "lora_name")
        await run_in_threadpool(registry.unregister, name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, "completion")

    async def _generate(http: Request, kind: str) -> Response:
        body = await _json(http, limits)
        default = limits.max_new_tokens if kind == "chat" else min(16, limits.max_new_tokens)
        parsed = parse_request(body, kind, default, limits.max_new_tokens)
        if parsed.model == base_name:
            adapter = None
        elif parsed.model in registry.records:
            adapter = parsed.model
        else:
            raise ApiError(404, f"The model `{parsed.model}` does not exist.", "model")
        prompt_ids = _encode(tokenizer, parsed, kind)
        longest = min(limits.max_prompt_tokens, (engine.max_length or limits.max_prompt_tokens + 1) - 1)
        if len(prompt_ids) > longest:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens, above the limit of {longest}")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(event: Event) -> None:  # on the engine thread
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is gone
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = GenerationRequest(prompt_ids, adapter, parsed.params, on_event)
        try:
            engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry later") from e
        except RuntimeError as e:
            raise ApiError(503, str(e)) from e
        id_ = new_id("chatcmpl" if kind == "chat" else "cmpl")
        if parsed.stream:  # Starlette cancels the stream (and so the request) when the client leaves
            return StreamingResponse(
                _stream(job, events, id_, kind, parsed),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
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
                if event.error is not None:
                    raise ApiError(event.status, event.error)
        finally:
            if not event.final:  # the client left, or the server stops while it waits
                engine.cancel(job)
        use = usage(event.prompt_tokens, event.completion_tokens)
        build = chat_response if kind == "chat" else completion_response
        return JSONResponse(build(id_, parsed.model, "".join(text), event.finish_reason or "stop", use))

    async def _stream(
        job: GenerationRequest,
        events: asyncio.Queue[Event],
        id_: str,
        kind: str,
        parsed: ParsedRequest,
    ) -> AsyncIterator[str]:
        model = parsed.model
        finished = False

        def chunk(text: str, finish: str | None, use: dict[str, int] | None = None) -> str:
            if kind == "chat":
                payload = chat_chunk(id_, model, {"content": text} if text else {}, finish, use)
            else:
                payload = completion_chunk(id_, model, text, finish, use)
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if kind == "chat":
                opening = chat_chunk(id_, model, {"role": "assistant", "content": ""}, None)
                yield f"data: {json.dumps(opening)}\n\n"
            while True:
                event = await events.get()
                if event.error is not None:
                    finished = True
                    yield f"data: {json.dumps(error_body(event.status, event.error))}\n\n"
                    break
                if event.text and not event.final:
                    yield chunk(event.text, None)
                if event.final:
                    finished = True
                    yield chunk(event.text, event.finish_reason)
                    if parsed.include_usage:
                        yield chunk("", None, usage(event.prompt_tokens, event.completion_tokens))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (or the server stops): free the slot
                engine.cancel(job)

    return app


def _error(status: int, message: str, limits: ServeLimits, param: str | None = None) -> JSONResponse:
    """An error answer in OpenAI's shape; 429 and 503 say when to retry."""
    headers = {"Retry-After": str(limits.retry_after_seconds)} if status in (429, 503) else None
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


class _Guard:
    """ASGI middleware: the key check on /v1/, the body size bound, and the request counter.

    Plain ASGI rather than ``@app.middleware``: Starlette's ``BaseHTTPMiddleware`` sits between a
    streaming response and the client's disconnect message.
    """

    def __init__(self, app: Any, limits: ServeLimits, metrics: Any) -> None:
        self.app, self.limits, self.metrics = app, limits, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        refusal = None
        if path.startswith("/v1/") and self.limits.api_key is not None:
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                key.encode(), self.limits.api_key.encode()
            ):
                refusal = _error(
                    401, "missing or wrong API key (send Authorization: Bearer KEY)", self.limits
                )
        length = headers.get("content-length", "")
        if refusal is None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            refusal = _error(413, f"request body above {self.limits.max_body_bytes} bytes", self.limits)
        status = 500

        async def counting_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if refusal is not None:
                await refusal(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:  # the label is one of the routes (a client's made-up paths would add series forever)
            self.metrics.requests.labels(path if path in _ROUTES else "other", str(status)).inc()


async def _json(request: Request, limits: ServeLimits) -> dict[str, Any]:
    raw = bytearray()
    async for chunk in request.stream():  # a chunked body has no Content-Length to check beforehand
        raw += chunk
        if len(raw) > limits.max_body_bytes:
            raise ApiError(413, f"request body above {limits.max_body_bytes} bytes")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _encode(tokenizer: Any, parsed: ParsedRequest, kind: str) -> list[int]:
    """The prompt's token ids: chat messages through the tokenizer's chat template, text as is."""
    if kind == "completion":
        return list(tokenizer(parsed.prompt).input_ids)
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "the served model's tokenizer has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(parsed.prompt, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)
