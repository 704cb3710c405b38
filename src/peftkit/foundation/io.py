"""Adapter files and atomic writes: safetensors only, Hugging Face PEFT's file names and key prefix; a file
or a whole directory appears complete or not at all (:func:`atomic_write`, :func:`atomic_directory`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from peftkit.foundation.errors import UsageError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
PICKLED_WEIGHTS_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


def check_overwrite(path: Path, overwrite: bool, what: str, alternatives: str = "") -> None:
    """The one overwrite guard: ``path`` may be (re)written when it is absent or an empty directory, or
    when ``overwrite`` is given and it is not the working directory, the home directory or a parent of
    either (those are never deleted).

    Args:
        what: how the user named it (``"output_dir"``), for the message.
        alternatives: more ways out, appended to the hint (``", --resume to continue it"``).

    Raises:
        UsageError: ``path`` holds something and ``overwrite`` is off, or overwriting would delete a
            protected directory.
    """
    if overwrite:
        protected = {Path.cwd().resolve(), Path.home().resolve(), *Path.cwd().resolve().parents}
        if path.resolve() in protected:
            raise UsageError(f"--overwrite would delete {path.resolve()}; give {what} a directory of its own")
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(
            f"{what} {path} exists and is not empty; pass --overwrite to replace it{alternatives}"
        )


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree (after :func:`check_overwrite` allowed it)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def atomic_write(path: Path, write: Any) -> None:
    """Write ``path`` through a temporary file in the same directory, then rename it into place.

    Args:
        path: the final file; a reader sees either the old file or the complete new one.
        write: called with the temporary file's path; it must create that file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp_name))
        os.chmod(tmp_name, 0o666 & ~_current_umask())  # mkstemp makes 0600; give what open() would
        with open(tmp_name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(final: Path, replace: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside ``final``, then rename it into place.

    Yields the staging directory to fill; when the block ends normally its files are synced and it is
    renamed to ``final``, so a reader sees no directory or the complete one. On an error (or Ctrl-C) the
    staging directory is removed and ``final`` is untouched.

    Args:
        final: the directory to create.
        replace: remove an existing ``final`` first (after the new one is complete). Without it the
            rename fails with ``OSError`` where ``final`` holds anything.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        publish_directory(staging, final, replace=replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_directory(staging: Path, final: Path, replace: bool = False) -> None:
    """Sync every file under ``staging`` and rename it to ``final`` (removed first with ``replace``):
    the last step of :func:`atomic_directory`, for writers that fill ``staging`` from several processes."""
    for child in staging.rglob("*"):
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    if replace and (final.exists() or final.is_symlink()):
        remove_path(final)
    os.rename(staging, final)


def save_pretrained(saveables: Sequence[Any], directory: Path) -> None:
    """``save_pretrained`` of each of ``saveables`` (a transformers model, a tokenizer) into
    ``directory``, each file written atomically and with the mode ``open()`` would give it.

    transformers' files are written into a temporary directory inside ``directory`` and renamed into
    place one by one; safetensors creates its files with mode 0600, which would hide a merged model's
    weights from the other users its config and tokenizer files are readable by.
    """
    directory.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~_current_umask()
    with tempfile.TemporaryDirectory(prefix=".save_pretrained-", dir=directory) as tmp:
        for saveable in saveables:
            saveable.save_pretrained(tmp)
        for file in sorted(Path(tmp).rglob("*")):
            if file.is_file():
                target = directory / file.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(file, mode)
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(file, target)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_adapter(directory: Path, config_json: str, tensors: dict[str, Tensor]) -> None:
    """Write ``adapter_model.safetensors`` then ``adapter_config.json`` into ``directory``, atomically.

    Args:
        directory: created if missing.
        config_json: the config file's text.
        tensors: on-disk key → tensor; tensors are made contiguous and detached copies.
    """
    data = {key: t.detach().contiguous().cpu() for key, t in tensors.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(data, str(tmp), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(config_json))


def resolve_adapter_dir(path: str | os.PathLike[str]) -> Path:
    """A local adapter directory for ``path``: a local directory, or a Hugging Face Hub repo id.

    Raises:
        FileNotFoundError: neither a directory holding ``adapter_config.json`` nor a reachable repo.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{local} has no {CONFIG_NAME}: is it an adapter directory?")
        return local
    text = str(path)
    if local.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"adapter directory {text!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except Exception as error:  # offline, unknown repo, no huggingface_hub
        raise FileNotFoundError(
            f"adapter {text!r} is not a local directory and could not be fetched from the Hugging Face "
            f"Hub ({type(error).__name__}: {error})"
        ) from error


def read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read an adapter directory written by peftkit or Hugging Face PEFT.

    Returns:
        (the parsed ``adapter_config.json``, on-disk key → tensor).

    Raises:
        FileNotFoundError: no ``adapter_model.safetensors`` (a pickled ``.bin`` is refused: pickle can
            run arbitrary code).
        UsageError: the config is not valid JSON, the weights file is not a complete safetensors file
            (truncated, overwritten), or a tensor holds NaN or inf; the message names the file and the
            tensor.
    """
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"{directory / CONFIG_NAME} is not valid JSON: {error}") from error
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [name for name in PICKLED_WEIGHTS_NAMES if (directory / name).is_file()]
        hint = (
            f"; it has {pickled[0]}, a pickle file peftkit never loads (unpickling runs arbitrary code): "
            "convert it to safetensors where you trust it"
            if pickled
            else ""
        )
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}{hint}")
    return config, read_tensors(weights)


def read_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file, each checked to be finite.

    Raises:
        UsageError: the file is not a complete safetensors file (safetensors' reason given), or a
            tensor holds NaN or inf (the first such tensor named).
    """
    try:
        tensors = load_file(str(path))
    except SafetensorError as error:
        reason = str(error).removeprefix("Error while deserializing header: ")
        raise UsageError(
            f"{path} is damaged ({reason}): not a complete safetensors file; save or copy it again"
        ) from error
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UsageError(
                f"{path}: tensor {key} holds NaN or inf values; the adapter is corrupted (a diverged run?): "
                "retrain it or restore a good copy"
            )
    return tensors
