"""Building a server (base model, host, adapter bank, engine, app) and running it with uvicorn."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.serve.api import create_app
from peftkit.serve.bank import AdapterBank
from peftkit.serve.engine import Engine
from peftkit.serve.host import ModelHost
from peftkit.serve.limits import ServeLimits
from peftkit.serve.metrics import Metrics

__all__ = ["ServeSettings", "ThreadedServer", "bind", "build_app", "uvicorn_server"]

SHUTDOWN_MARGIN_SECONDS = 5.0  # after the grace period, for the last events to reach their clients


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``peftkit serve`` takes (its flags, one field each).

    Attributes:
        model: the base model: the bundled SmolLM2 by default, a directory, a Hub id or a .gguf file.
        adapters: ``{name: directory}`` loaded at start-up (trusted: not limited to ``adapter_root``).
        adapter_root: the only directory runtime loading reads from; None: runtime loading is off.
        max_concurrent: requests in the running batch at most.
        max_queue: requests waiting at most; beyond that, 429.
        max_adapters: adapter slots (adapters running at once; LRU reuse); None: as many as are used.
        max_cpu_adapters: adapters kept in memory, those in slots included (LRU); None: every registered one.
        max_rank: the largest adapter rank accepted; None: any.
        dtype: the base model's dtype.
        quantize: ``"nf4"``, ``"fp4"`` or ``"int8"``, or None.
        limits: per-request and per-connection limits and the API key.
    """

    model: str = "smollm2-135m-instruct"
    adapters: dict[str, str] = field(default_factory=dict)
    adapter_root: str | None = None
    max_concurrent: int = 8
    max_queue: int = 64
    max_adapters: int | None = None
    max_cpu_adapters: int | None = None
    max_rank: int | None = None
    dtype: str = "float32"
    quantize: str | None = None
    limits: ServeLimits = field(default_factory=ServeLimits)


def build_app(settings: ServeSettings, base_name: str | None = None) -> tuple[Any, Engine]:
    """Load the base model and the start-up adapters; return the FastAPI app and its (unstarted) engine.

    Args:
        settings: the server's settings.
        base_name: the ``model`` name of the base in the API (default: ``settings.model``).

    Raises:
        AdapterError: a start-up adapter is refused (the reason says why).
    """
    from peftkit.foundation.loading import load_model

    base, tokenizer = load_model(settings.model, dtype=settings.dtype, quantize=settings.quantize)
    if tokenizer is None:
        raise ValueError(f"{settings.model} has no tokenizer files; the server needs one")
    name = base_name or settings.model
    host = ModelHost(base, tokenizer)
    metrics = Metrics()
    bank = AdapterBank(
        host.model,
        host.context,
        name,
        max_slots=settings.max_adapters,
        max_rank=settings.max_rank,
        max_resident=settings.max_cpu_adapters,
        root=Path(settings.adapter_root) if settings.adapter_root else None,
        metrics=metrics,
    )
    metrics.adapters_loaded.set_function(lambda: len(bank.loaded_names()))
    metrics.adapters_resident.set_function(lambda: len(bank.resident_names()))
    for adapter, directory in settings.adapters.items():
        bank.register(adapter, directory, runtime=False)
    engine = Engine(host, bank, metrics, name, settings.max_concurrent, settings.max_queue)
    return create_app(engine, name, settings.limits), engine


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` (port 0: a free one), for uvicorn to serve on.

    Listening from here on, connections made while the model loads wait in the backlog.

    Raises:
        OSError: the address is taken or not this machine's.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def uvicorn_server(app: Any) -> Any:
    """A uvicorn server for ``app`` (from :func:`build_app`; warnings only) that shuts down gracefully:
    it stops accepting, the engine refuses new requests and ends waiting ones with a 503, running ones
    get the limits' ``shutdown_grace_seconds`` to finish and then a 503 (JSON, or an error event and
    ``[DONE]``). Slow clients are bounded by the limits (read timeout, keep-alive, connections)."""
    import uvicorn

    from peftkit.serve.guard import guarded_protocol

    engine, limits = app.state.engine, app.state.limits

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            engine.drain(limits.shutdown_grace_seconds)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        log_level="warning",
        http=guarded_protocol(limits),
        timeout_keep_alive=limits.keep_alive_seconds,
        timeout_graceful_shutdown=limits.shutdown_grace_seconds + SHUTDOWN_MARGIN_SECONDS,
    )
    return DrainingServer(config)


class ThreadedServer:
    """A uvicorn server on its own thread, on a socket bound here (port 0: a free one); for tests and
    benchmarks. ``with ThreadedServer(app) as server: server.url``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.socket = bind(host, port)
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"
        self.engine: Engine = app.state.engine
        self.server = uvicorn_server(app)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread ended before it started")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(60)
        self.socket.close()
