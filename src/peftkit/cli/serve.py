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

__all__ = ["register_serve", "run_serve"]

_EXTRA = ("fastapi", "uvicorn", "prometheus_client")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    parser.add_argument(
        "--max-concurrent", metavar="N", type=int, default=8, help="requests decoded together (default: 8)"
    )
    parser.add_argument(
        "--max-queue", metavar="N", type=int, default=64, help="requests waiting; beyond: 429 (default: 64)"
    )
    parser.add_argument(
        "--max-prompt-tokens", type=int, metavar="N", default=4096, help="longest prompt (default: 4096)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, metavar="N", default=512, help="largest max_tokens (default: 512)"
    )
    parser.add_argument(
        "--max-adapters",
        metavar="N",
        type=int,
        default=None,
        help="adapters in memory at once, LRU eviction (default: all)",
    )
    parser.add_argument(
        "--max-rank", type=int, default=None, metavar="R", help="refuse adapters of a higher rank"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--quantize", default="none", choices=("none", "nf4", "fp4", "int8"))
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    missing = [name for name in _EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"peftkit serve needs {', '.join(missing)}: pip install 'peftkit[serve]'")
    adapters = _adapter_flags(args.adapter)
    for flag in (
        "max_concurrent",
        "max_queue",
        "max_prompt_tokens",
        "max_new_tokens",
        "max_adapters",
        "max_rank",
    ):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.adapter_root is not None and not os.path.isdir(args.adapter_root):
        raise UsageError(f"--adapter-root {args.adapter_root}: no such directory")
    api_key = args.api_key or os.environ.get("PEFTKIT_API_KEY") or None
    if args.host not in _LOOPBACK and api_key is None:
        print(f"peftkit serve: warning: listening on {args.host} without --api-key", file=sys.stderr)

    from peftkit.foundation.loading import DEFAULT_MODEL
    from peftkit.serve.adapters import AdapterError
    from peftkit.serve.api import ServeLimits
    from peftkit.serve.server import ServeSettings, bind, build_app, uvicorn_server

    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        raise UsageError(
            f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port"
        ) from e
    model = args.model or DEFAULT_MODEL
    settings = ServeSettings(
        model=model,
        adapters=adapters,
        adapter_root=args.adapter_root,
        max_concurrent=args.max_concurrent,
        max_queue=args.max_queue,
        max_adapters=args.max_adapters,
        max_rank=args.max_rank,
        dtype=args.dtype,
        quantize=None if args.quantize == "none" else args.quantize,
        limits=ServeLimits(
            api_key=api_key, max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens
        ),
    )
    print(f"peftkit serve: loading {model} and {len(adapters)} adapter(s)...", file=sys.stderr, flush=True)
    try:
        app, _ = build_app(settings)
    except AdapterError as e:
        sock.close()
        raise UsageError(str(e)) from e
    server = uvicorn_server(app)
    # On SIGINT/SIGTERM uvicorn stops taking requests, gives running ones 5 s, stops the engine (the rest
    # get an error), puts the handlers it found back and raises the signal again. Ours only asks the
    # server to stop (a signal before uvicorn's own handlers are in place does too), so the command ends
    # here rather than in a KeyboardInterrupt inside the event loop.
    previous = {
        sig: signal.signal(sig, lambda *_: setattr(server, "should_exit", True)) for sig in _STOP_SIGNALS
    }
    try:
        names = ", ".join(adapters) or "none (runtime loading " + ("on" if args.adapter_root else "off") + ")"
        print(
            f"peftkit serve: http://{args.host}:{sock.getsockname()[1]}/v1  model {model!r}, adapters: "
            f"{names}; Ctrl-C stops",
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
