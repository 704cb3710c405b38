"""``peftkit export SOURCE OUT --format gguf|gguf-lora|ollama``: out of peftkit into llama.cpp and Ollama."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from peftkit.export import FORMATS, OUTTYPES

__all__ = ["register_export", "run_export"]


def register_export(subparsers: Any) -> None:
    """``peftkit export SOURCE OUT [--format F] [--outtype T] [--model BASE] [--overwrite] [--verify]``."""
    parser = subparsers.add_parser(
        "export",
        help="export a run, adapter or model to GGUF for llama.cpp, or to an Ollama model directory",
        description="Write GGUF files llama.cpp (llama-cli, llama-server) and Ollama run, in pure Python. "
        "gguf: the adapter merged into its base, one file with the tokenizer and chat template. gguf-lora: "
        "the adapter alone, for llama.cpp's --lora on the base's GGUF (export the base with SOURCE = the "
        "model). ollama: a directory with the merged GGUF and a Modelfile (chat template, stop tokens, the "
        "run's system prompt). Supported: Llama (SmolLM2, Mistral), Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3.",
    )
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="output_dir of peftkit train, an adapter directory, a transformers model directory, or a "
        "model name (smollm2-135m-instruct, a Hugging Face id)",
    )
    parser.add_argument(
        "out", metavar="OUT", help="the .gguf file to write (a directory for --format ollama)"
    )
    parser.add_argument("--format", choices=FORMATS, default="gguf", help="what to write (default: gguf)")
    parser.add_argument(
        "--outtype",
        choices=OUTTYPES,
        default="f16",
        help="tensor type: f32, f16 (default), bf16, q8_0 (about 0.27x the f32 file); norms stay f32",
    )
    parser.add_argument("--model", help="base model, if not the one the run or adapter records")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="load the result in llama.cpp (pip install 'peftkit[llamacpp]') and compare it with peftkit "
        "on a few prompts: token ids, greedy tokens, logits",
    )
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from peftkit.export.gguf_export import export

    result = export(
        args.source,
        args.out,
        format=args.format,
        outtype=args.outtype,
        model=args.model,
        overwrite=args.overwrite,
        verify=args.verify,
    )
    for note in result.notes:
        print(f"note: {note}")
    files = ", ".join(str(path) for path in result.files)
    print(
        f"exported {args.source} ({result.architecture}, {args.outtype}) to {files} in {result.seconds:.1f}s"
    )
    print(_next_step(args.format, result.files))
    if result.verify is not None:
        print(
            f"llama.cpp against peftkit ({args.outtype}, greedy, {result.verify.rows[0].new_tokens} tokens):"
        )
        print(result.verify.table())
        if not result.verify.greedy_equal:
            print("some continuations differ (expected for f16/bf16/q8_0 rounding; not for f32)")
    return 0


def _next_step(format: str, files: list[Any]) -> str:
    if format == "ollama":
        return f"run it: ollama create NAME -f {files[-1]} && ollama run NAME"
    if format == "gguf-lora":
        base = "BASE.gguf from: peftkit export BASE_MODEL BASE.gguf"
        return f"run it: llama-cli -m BASE.gguf --lora {files[0]}  ({base})"
    return f"run it: llama-cli -m {files[0]}  (or llama-server -m {files[0]})"
