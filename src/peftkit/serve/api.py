"""The FastAPI app: OpenAI's completions, chat completions and models, vLLM's adapter loading, health,
metrics. The model runs on the engine's thread; checking and tokenizing on a small thread pool; the
handlers here only route (generation: :mod:`peftkit.serve.generation`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from peftkit.serve.adapter_files import AdapterError
from peftkit.serve.engine import Engine
from peftkit.serve.generation import Completions
from peftkit.serve.guard import Guard, error_response, read_body
from peftkit.serve.limits import ServeLimits
from peftkit.serve.protocol import ApiError, parse_json

__all__ = ["create_app"]

PREPARE_THREADS = 2  # checking and tokenizing requests, off the event loop


def create_app(engine: Engine, base_name: str, limits: ServeLimits) -> FastAPI:
    """The app for ``engine``; starting it (its lifespan) starts the engine, stopping it stops the engine.

    Args:
        engine: the scheduler, with its host (model, tokenizer), bank (adapters) and metrics.
        base_name: the ``model`` name that means the base model alone.
        limits: request limits and the API key.
    """
    executor = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="peftkit-prepare")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="peftkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.limits = engine, limits  # what serving it needs (server.uvicorn_server)
    app.add_middleware(Guard, limits=limits, metrics=engine.metrics)
    _add_error_handlers(app, limits)
    _add_status_routes(app, engine, base_name)
    _add_adapter_routes(app, engine, limits)
    completions = Completions(engine, base_name, limits, executor)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await completions.answer(request, await read_body(request, limits), "chat")

    @app.post("/v1/completions")
    async def text_completions(request: Request) -> Response:
        return await completions.answer(request, await read_body(request, limits), "completion")

    return app


def _add_error_handlers(app: FastAPI, limits: ServeLimits) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, str(exc), limits, exc.param)

    @app.exception_handler(AdapterError)
    async def adapter_error(_: Request, exc: AdapterError) -> JSONResponse:
        return error_response(exc.status, str(exc), limits)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", limits)


def _add_status_routes(app: FastAPI, engine: Engine, base_name: str) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        state = engine.health()
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        entry = {"object": "model", "created": created, "owned_by": "peftkit"}
        data = [{"id": base_name, **entry, "root": base_name, "parent": None}]
        data += [{"id": name, **entry, "root": name, "parent": base_name} for name in engine.bank.names()]
        return {"object": "list", "data": data}


def _add_adapter_routes(app: FastAPI, engine: Engine, limits: ServeLimits) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        body = parse_json(await read_body(request, limits))
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise ApiError(400, "lora_name and lora_path (strings) are required")
        await run_in_threadpool(engine.bank.register, name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> PlainTextResponse:
        body = parse_json(await read_body(request, limits))
        name = body.get("lora_name")
        if not isinstance(name, str):
            raise ApiError(400, "lora_name (a string) is required", "lora_name")
        engine.bank.unregister(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
