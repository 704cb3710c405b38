"""``export(source, out, format=...)``: a run, adapter or model into llama.cpp / Ollama's GGUF, the Python
side of ``peftkit export``.

- ``"gguf"``: the merged model in one GGUF file (hyper-parameters, tokenizer, chat template, weights).
- ``"gguf-lora"``: the adapter alone as a llama.cpp LoRA GGUF, for ``--lora`` on the base's GGUF.
- ``"ollama"``: a directory with the merged GGUF and a Modelfile.

Everything is checked before a file is written, and each file is written under a temporary name and
renamed, so OUT appears complete or not at all.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from peftkit.export import FORMATS, OUTTYPES
from peftkit.export.architectures import Architecture, architecture_of, write_common_hparams
from peftkit.export.chat_format import recognise_chat_format
from peftkit.export.gguf_file import FILE_TYPES, write_gguf
from peftkit.export.lora import lora_tensors
from peftkit.export.merged import model_tensors
from peftkit.export.modelfile import modelfile_text
from peftkit.export.sources import Source, open_source
from peftkit.export.verify import VerifyReport, llama_cpp_available, verify_gguf
from peftkit.export.vocabulary import Vocabulary, read_vocabulary
from peftkit.foundation.errors import UsageError
from peftkit.foundation.io import atomic_directory, atomic_write, check_overwrite

__all__ = ["FORMATS", "ExportResult", "export"]

MODELFILE = "Modelfile"


@dataclass
class ExportResult:
    """What :func:`export` wrote.

    Attributes:
        files: the files written (the GGUF first).
        architecture: the family exported ("Llama" …).
        seconds: time from opening SOURCE to the last file renamed into place (verification excluded).
        verify: llama.cpp's comparison, when asked for.
        notes: things the user should know (e.g. the float base used for a 4-bit run).
    """

    files: list[Path]
    architecture: str
    seconds: float
    verify: VerifyReport | None = None
    notes: list[str] = field(default_factory=list)


def export(
    source: str | Path,
    out: str | Path,
    format: str = "gguf",
    outtype: str = "f16",
    model: str | None = None,
    overwrite: bool = False,
    verify: bool = False,
) -> ExportResult:
    """Export SOURCE (a run, adapter or model directory, or a model name) to GGUF at OUT.

    Args:
        source: ``output_dir`` of ``peftkit train``, an adapter directory, a transformers model directory,
            or a model name (``smollm2-135m-instruct``, a Hugging Face id).
        out: the ``.gguf`` file (``gguf``, ``gguf-lora``) or the directory (``ollama``) to create.
        format: ``"gguf"``, ``"gguf-lora"`` or ``"ollama"``.
        outtype: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"``.
        model: the base model, replacing the one the run or adapter records.
        overwrite: replace an existing OUT.
        verify: load the result in llama.cpp and compare it with peftkit (needs llama-cpp-python).

    Raises:
        UsageError: bad arguments or input, said in one line; nothing is written then.
    """
    out = Path(out)
    _check_arguments(out, format, outtype, overwrite, verify)
    started = time.perf_counter()
    opened = open_source(source, model)
    arch = architecture_of(opened.model.config)
    vocabulary = read_vocabulary(opened.tokenizer, opened.model.config.vocab_size)
    notes = list(vocabulary.caveats)
    if opened.trained_quantized:
        notes.append(f"the run trained on a {opened.trained_quantized} base; exported with the float base")
    if format == "gguf-lora":
        written, reference = _export_lora(opened, arch, out, outtype), opened.model
    else:
        written, reference = _export_merged(opened, arch, vocabulary, out, format, outtype)
    seconds = time.perf_counter() - started
    report = _verify(opened, arch, vocabulary, reference, written[0], format) if verify else None
    return ExportResult(written, arch.name, seconds, report, notes)


def _check_arguments(out: Path, format: str, outtype: str, overwrite: bool, verify: bool) -> None:
    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    if outtype not in OUTTYPES:
        raise UsageError(f"unknown outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    check_overwrite(out, overwrite, "OUT")
    if format != "ollama" and out.is_dir():
        raise UsageError(
            f"OUT {out} is a directory; --format {format} writes one file (e.g. {out}/model.gguf)"
        )
    if verify and not llama_cpp_available():
        raise UsageError("--verify needs llama-cpp-python: pip install 'peftkit[llamacpp]'")


def _merged_model(opened: Source) -> Any:
    if opened.adapter is None:
        return opened.model
    try:
        return opened.model.merge_and_unload(safe_merge=True)
    except (ValueError, NotImplementedError) as e:
        raise UsageError(f"cannot merge the adapter: {e}") from e


def _export_merged(
    opened: Source, arch: Architecture, vocabulary: Vocabulary, out: Path, format: str, outtype: str
) -> tuple[list[Path], Any]:
    """Write the merged GGUF (and the Modelfile); returns the files and the merged model."""
    modelfile = None
    if format == "ollama":
        chat = recognise_chat_format(opened.tokenizer, vocabulary.add_bos)
        modelfile = modelfile_text(
            "model.gguf", chat, opened.tokenizer, opened.system_prompt, opened.prompt_template
        )
    merged = _merged_model(opened)  # what cannot be merged is refused before anything is written
    tensors = model_tensors(merged, arch, outtype)

    def metadata(writer: gguf.GGUFWriter) -> None:
        _write_model_metadata(writer, opened.name, arch, merged.config, vocabulary, outtype)

    if modelfile is None:
        atomic_write(out, lambda tmp: write_gguf(tmp, arch.arch_name, metadata, tensors))
        return [out], merged
    with atomic_directory(out, replace=True) as staging:
        write_gguf(staging / "model.gguf", arch.arch_name, metadata, tensors)
        (staging / MODELFILE).write_text(modelfile)
    return [out / "model.gguf", out / MODELFILE], merged


def _write_model_metadata(
    writer: gguf.GGUFWriter, name: str, arch: Architecture, config: Any, vocabulary: Vocabulary, outtype: str
) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    write_common_hparams(config, writer)
    arch.write_hparams(config, writer)
    writer.add_file_type(FILE_TYPES[outtype])
    vocabulary.write(writer)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _export_lora(opened: Source, arch: Architecture, out: Path, outtype: str) -> list[Path]:
    if opened.adapter is None:
        raise UsageError("SOURCE holds no adapter; --format gguf-lora exports an adapter (use --format gguf)")
    alpha, tensors = lora_tensors(opened.model, opened.adapter, arch, outtype)
    atomic_write(
        out, lambda tmp: write_gguf(tmp, arch.arch_name, _lora_metadata(opened.name, alpha), tensors)
    )
    return [out]


def _lora_metadata(name: str, alpha: float) -> Any:
    def write(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    return write


def _verify(
    opened: Source, arch: Architecture, vocabulary: Vocabulary, reference: Any, written: Path, format: str
) -> VerifyReport:
    """llama.cpp on what was written; a LoRA GGUF runs on a float32 GGUF of its base, made for the check."""
    if format != "gguf-lora":
        return verify_gguf(written, reference, opened.tokenizer)
    config = opened.model.config
    with tempfile.TemporaryDirectory(prefix="peftkit-verify-") as tmp:
        base_path = Path(tmp) / "base.gguf"
        write_gguf(
            base_path,
            arch.arch_name,
            lambda writer: _write_model_metadata(writer, opened.name, arch, config, vocabulary, "f32"),
            model_tensors(opened.model.model, arch, "f32"),
        )
        return verify_gguf(base_path, reference, opened.tokenizer, lora_path=written)
