"""``peftkit serve``: the base model and its adapters behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from peftkit.foundation.errors import UsageError
from peftkit.serve.limits import REQUEST_LIMITS

__all__ = ["register_serve", "run_serve"]

_EXTRA = ("fastapi", "uvicorn", "prometheus_client")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# (flag, type, default, help): the bounds on the work, each at least 1 when given.
_BOUNDS: tuple[tuple[str, type, Any, str], ...] = (
    ("--max-concurrent", int, 8, "requests decoded together (default: 8)"),
    ("--max-queue", int, 64, "requests waiting; beyond: 429 (default: 64)"),
    ("--max-prompt-tokens", int, 4096, "longest prompt in tokens; its bytes are bounded at 16 per token "
     "before tokenizing (default: 4096)"),
    ("--max-new-tokens", int, 512, "largest max_tokens (default: 512)"),
    ("--max-adapters", int, None, "adapter slots: adapters running at once, the least recently used idle one "
     "reused (default: as many as are used, up to --max-cpu-adapters)"),
    ("--max-cpu-adapters", int, None, "adapters kept in memory, those in slots included (so at least "
     "--max-adapters); beyond, the least recently used is read from disk again when asked for "
     "(default: all registered)"),
    ("--max-rank", int, None, "refuse adapters of a higher rank"),
    ("--max-connections", int, 256, "open connections; more are closed at once (default: 256)"),
    ("--read-timeout", float, 10.0, "seconds for a request's headers, then its body, to arrive "
     "(default: 10)"),
    ("--keep-alive", float, 5.0, "seconds an idle kept-alive connection stays open (default: 5)"),
    ("--shutdown-grace", float, 5.0, "on SIGINT/SIGTERM, seconds running requests get to finish before a "
     "503 (default: 5)"),
)  # fmt: skip


def register_serve(subparsers: Any) -> None:
    """``peftkit serve [--model BASE] [--adapter NAME=DIR ...] ...``."""
    parser = subparsers.add_parser(
        "serve",
        help="serve the base model and adapters behind an OpenAI-compatible API",
        description="Serve one base model and any number of adapters over HTTP, OpenAI-compatible "
        "(/v1/models, /v1/completions, /v1/chat/completions; vLLM's /v1/load_lora_adapter and "
        "/v1/unload_lora_adapter; /health, /metrics). A request's `model` is an adapter name or the base "
        "model's name. Requests are batched together, each row with its own adapter. Needs the serve extra: "
        "pip install 'peftkit[serve]'.",
        epilog=f"Requests must keep: {REQUEST_LIMITS}; otherwise 400.",
    )
    parser.add_argument(
        "--model",
        metavar="BASE",
        default=None,
        help="base model (default: the bundled SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an adapter to serve as NAME (repeatable; DIR: peftkit train's output_dir or any adapter dir)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, metavar="PORT", help="port (default: 8000)")
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=None,
        help="clients must send 'Authorization: Bearer KEY' (or set PEFTKIT_API_KEY)",
    )
    parser.add_argument(
        "--adapter-root",
        default=None,
        metavar="DIR",
        help="allow /v1/load_lora_adapter, for directories inside DIR only (default: off)",
    )
    for flag, kind, default, text in _BOUNDS:
        parser.add_argument(
            flag, type=kind, default=default, metavar="N" if kind is int else "SECONDS", help=text
        )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="CPU threads; 0: the cores other programs leave free (default: 0)",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--quantize", default="none", choices=("none", "nf4", "fp4", "int8"))
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    missing = [name for name in _EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"peftkit serve needs {', '.join(missing)}: pip install 'peftkit[serve]'")
    settings = _settings(args)
    if args.host not in _LOOPBACK and settings.limits.api_key is None:
        print(f"peftkit serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    _set_threads(args.threads)

    from peftkit.serve.adapter_files import AdapterError
    from peftkit.serve.server import bind, build_app, uvicorn_server

    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        raise UsageError(
            f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port"
        ) from e
    print(
        f"peftkit serve: loading {settings.model} and {len(settings.adapters)} adapter(s)...",
        file=sys.stderr,
        flush=True,
    )
    try:
        app, _ = build_app(settings)
    except AdapterError as e:
        sock.close()
        raise UsageError(str(e)) from e
    server = uvicorn_server(app)
    # On SIGINT/SIGTERM uvicorn stops taking requests; the engine ends waiting ones with a 503, gives
    # running ones the grace period, then ends them with a 503; uvicorn puts the handlers it found back and
    # raises the signal again. Ours only asks the server to stop (a signal before uvicorn's own handlers
    # are in place does too), so the command ends here rather than in a KeyboardInterrupt.
    previous = {
        sig: signal.signal(sig, lambda *_: setattr(server, "should_exit", True)) for sig in _STOP_SIGNALS
    }
    try:
        names = (
            ", ".join(settings.adapters)
            or "none (runtime loading " + ("on" if args.adapter_root else "off") + ")"
        )
        where = f"http://{args.host}:{sock.getsockname()[1]}/v1"
        print(
            f"peftkit serve: {where}  model {settings.model!r}, adapters: {names}; Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    print("peftkit serve: stopped", file=sys.stderr)
    return 0


def _settings(args: argparse.Namespace) -> Any:
    """The server's settings from the flags (``UsageError`` for a bad one)."""
    for flag, kind, *_ in _BOUNDS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value <= 0:
            least = "at least 1" if kind is int else "above 0"
            raise UsageError(f"{flag} must be {least}, got {value}")
    cpu, slots = args.max_cpu_adapters, args.max_adapters
    if cpu is not None and slots is not None and cpu < slots:
        raise UsageError(
            f"--max-cpu-adapters {cpu} is below --max-adapters {slots}: adapters in slots stay in memory "
            "too; raise --max-cpu-adapters or lower --max-adapters"
        )
    if args.threads < 0:
        raise UsageError(f"--threads must be 0 (automatic) or more, got {args.threads}")
    if args.adapter_root is not None and not os.path.isdir(args.adapter_root):
        raise UsageError(f"--adapter-root {args.adapter_root}: no such directory")

    from peftkit.foundation.loading import DEFAULT_MODEL
    from peftkit.serve.limits import ServeLimits
    from peftkit.serve.server import ServeSettings

    limits = ServeLimits(
        api_key=args.api_key or os.environ.get("PEFTKIT_API_KEY") or None,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        read_timeout_seconds=args.read_timeout,
        keep_alive_seconds=args.keep_alive,
        max_connections=args.max_connections,
        shutdown_grace_seconds=args.shutdown_grace,
    )
    return ServeSettings(
        model=args.model or DEFAULT_MODEL,
        adapters=_adapter_flags(args.adapter),
        adapter_root=args.adapter_root,
        max_concurrent=args.max_concurrent,
        max_queue=args.max_queue,
        max_adapters=args.max_adapters,
        max_cpu_adapters=args.max_cpu_adapters,
        max_rank=args.max_rank,
        dtype=args.dtype,
        quantize=None if args.quantize == "none" else args.quantize,
        limits=limits,
    )


def _set_threads(threads: int) -> None:
    """``--threads``, else ``OMP_NUM_THREADS``, else the cores other programs leave free (as train)."""
    import torch

    from peftkit.foundation.cpu_load import chosen_threads

    wanted = chosen_threads(threads)
    if wanted is not None:
        torch.set_num_threads(wanted)


def _adapter_flags(values: list[str]) -> dict[str, str]:
    """``["json=out/train", ...]`` → ``{"json": "out/train"}``, checking each directory exists."""
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise UsageError(f"--adapter {value!r}: write NAME=DIR, e.g. --adapter json=out/train")
        if name in adapters:
            raise UsageError(f"--adapter {name} is given twice")
        if not os.path.isdir(directory):
            raise UsageError(f"--adapter {name}={directory}: no such directory")
        adapters[name] = directory
    return adapters
