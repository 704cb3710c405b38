"""What stands between a client and the handlers: the API key, size and time limits, the request count.

- :class:`Guard`, plain ASGI middleware: the key check on ``/v1/``, the ``Content-Length`` bound, the
  request counter. Plain ASGI rather than ``@app.middleware``: Starlette's ``BaseHTTPMiddleware`` sits
  between a streaming response and the client's disconnect message.
- :func:`read_body`: the body, bounded in bytes and in time (a chunked body has no length to check).
- :func:`guarded_protocol`: uvicorn's h11 protocol with what uvicorn lacks: a connection must send its
  request headers within the read timeout (uvicorn times out idle kept-alive connections only, so a
  client sending a header line every few seconds held a connection forever), and connections beyond
  the cap are closed as they open.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

import h11
from starlette.requests import Request
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from peftkit.serve.limits import ServeLimits
from peftkit.serve.protocol import ApiError, error_body

__all__ = ["ROUTES", "Guard", "error_response", "guarded_protocol", "read_body"]

ROUTES = frozenset(
    {
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
    }
)


def error_response(status: int, message: str, limits: ServeLimits, param: str | None = None) -> JSONResponse:
    """An error answer in OpenAI's shape; 429 and 503 say when to retry; 408 and 413 close the
    connection (the rest of the body is not read)."""
    headers = {"Retry-After": str(limits.retry_after_seconds)} if status in (429, 503) else {}
    if status in (408, 413):
        headers["Connection"] = "close"
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


class Guard:
    """ASGI middleware: the key check on /v1/, the body size bound, and the request counter."""

    def __init__(self, app: Any, limits: ServeLimits, metrics: Any) -> None:
        self.app, self.limits, self.metrics = app, limits, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        refusal = self._refusal(path, scope["headers"])
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
            self.metrics.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def _refusal(self, path: str, raw_headers: list[tuple[bytes, bytes]]) -> JSONResponse | None:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in raw_headers}
        if path.startswith("/v1/") and self.limits.api_key is not None:
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                key.encode(), self.limits.api_key.encode()
            ):
                return error_response(
                    401, "missing or wrong API key (send Authorization: Bearer KEY)", self.limits
                )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limits.max_body_bytes:
            return error_response(413, f"request body above {self.limits.max_body_bytes} bytes", self.limits)
        return None


async def read_body(request: Request, limits: ServeLimits) -> bytes:
    """The request body, at most ``max_body_bytes``, arrived within ``read_timeout_seconds``.

    Raises:
        ApiError: 413 too large, 408 too slow.
    """
    try:
        return await asyncio.wait_for(
            _read_bounded(request, limits.max_body_bytes), limits.read_timeout_seconds
        )
    except asyncio.TimeoutError as error:
        raise ApiError(
            408, f"the request body did not arrive within {limits.read_timeout_seconds:g} s"
        ) from error


async def _read_bounded(request: Request, max_bytes: int) -> bytes:
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise ApiError(413, f"request body above {max_bytes} bytes")
    return bytes(raw)


def guarded_protocol(limits: ServeLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a request-header timeout and a cap on open connections."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                transport.close()
                return
            self._watch_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_watching()
            super().connection_lost(exc)

        def _watch_headers(self) -> None:
            """While a request's headers are awaited (and the keep-alive timer does not already watch an
            idle connection), they must come within the read timeout."""
            awaiting = self.conn.their_state is h11.IDLE and self.timeout_keep_alive_task is None
            if not awaiting:
                self._stop_watching()
            elif self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(limits.read_timeout_seconds, self._headers_too_slow)

        def _stop_watching(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
