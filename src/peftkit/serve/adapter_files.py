"""Reading an adapter directory for the server: once, checked, and only from where it may be read.

Every load — registration, and a reload after the CPU tier dropped the adapter — goes through
:func:`read_adapter_files`: the path and each file are resolved (symbolic links followed) and must lie
inside the adapter root, each file is read into memory once, and the config and the safetensors
tensors are parsed from those bytes. What is checked is what gets used: nothing is read again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peftkit.foundation.io import CONFIG_NAME, PICKLED_WEIGHTS_NAMES, WEIGHTS_NAME

__all__ = ["AdapterError", "AdapterFiles", "read_adapter_files", "resolve_inside"]

MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few kB


class AdapterError(Exception):
    """A refused adapter operation; ``status`` is the HTTP status that says why (4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter directory's contents as read: the config (a JSON object) and the tensors by key."""

    directory: Path
    config: dict[str, Any]
    tensors: dict[str, Tensor]


def resolve_inside(root: Path, path: str | Path) -> Path:
    """``path`` (absolute, or relative to ``root``) resolved, refused unless it lies inside ``root``.

    Symbolic links are resolved first, so neither ``..`` nor a link can lead out of ``root``.

    Raises:
        AdapterError: 403 outside ``root``, 400 no such directory.
    """
    root = root.resolve()
    candidate = Path(path).expanduser()
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise AdapterError(403, f"lora_path {str(path)!r} is outside the adapter root {str(root)!r}")
    if not resolved.is_dir():
        raise AdapterError(400, f"lora_path {str(path)!r}: no such directory under the adapter root")
    return resolved


def read_adapter_files(directory: Path, root: Path | None) -> AdapterFiles:
    """Read and parse ``adapter_config.json`` and ``adapter_model.safetensors`` in ``directory``.

    Args:
        directory: the adapter directory (as registered).
        root: the directory both files must lie in (after resolving links); None: any (the operator's
            own ``--adapter`` directories).

    Raises:
        AdapterError: 403 a file or the directory outside ``root``; 400 a missing file, pickled weights
            only, a config that is not a JSON object, weights that are not a complete safetensors file
            (truncated, corrupted), or a tensor holding NaN or inf.
    """
    if root is not None:
        directory = resolve_inside(root, directory)
    config_bytes = _read(
        directory, CONFIG_NAME, root, f"{directory} has no {CONFIG_NAME}: is it an adapter directory?"
    )
    pickled = [name for name in PICKLED_WEIGHTS_NAMES if (directory / name).is_file()]
    hint = f" (it has {pickled[0]}: pickle files are never loaded)" if pickled else ""
    weights_bytes = _read(directory, WEIGHTS_NAME, root, f"{directory} has no {WEIGHTS_NAME}{hint}")
    try:
        config = json.loads(config_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise AdapterError(400, f"{directory / CONFIG_NAME} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise AdapterError(400, f"{directory / CONFIG_NAME} is not a JSON object")
    return AdapterFiles(directory, config, _tensors(directory / WEIGHTS_NAME, weights_bytes))


def _tensors(path: Path, data: bytes) -> dict[str, Tensor]:
    """The tensors in ``data`` (the bytes of ``path``), each floating one checked to be finite; the
    messages are those of :func:`peftkit.foundation.io.read_tensors`, which reads from a path."""
    from safetensors.torch import load as load_safetensors

    try:
        tensors = load_safetensors(data)
    except Exception as error:  # safetensors raises its own SafetensorError, and others on odd headers
        reason = str(error).removeprefix("Error while deserializing header: ")
        raise AdapterError(
            400, f"{path} is damaged ({reason}): not a complete safetensors file; save or copy it again"
        ) from error
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterError(
                400,
                f"{path}: tensor {key} holds NaN or inf values; the adapter is corrupted (a diverged run?): "
                "retrain it or restore a good copy",
            )
    return tensors


def _read(directory: Path, name: str, root: Path | None, missing: str) -> bytes:
    """The bytes of ``directory / name``, after checking that the file it resolves to is a regular file
    inside ``root``; the file is opened without following a link, so it cannot be swapped in between."""
    path = directory / name
    resolved = path.resolve()
    if root is not None and not resolved.is_relative_to(root.resolve()):
        raise AdapterError(403, f"{path}: {name} links outside the adapter root")
    if not resolved.is_file():
        raise AdapterError(400, missing)
    limit = MAX_CONFIG_BYTES if name == CONFIG_NAME else None
    try:
        descriptor = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as error:
        raise AdapterError(400, f"{path} cannot be read: {error.strerror}") from error
    with os.fdopen(descriptor, "rb") as file:
        data = file.read(limit + 1 if limit is not None else -1)
    if limit is not None and len(data) > limit:
        raise AdapterError(400, f"{path} is larger than {limit} bytes; is it an adapter config?")
    return data
