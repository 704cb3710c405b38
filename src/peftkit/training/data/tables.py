"""Reading training data: local data files (``.jsonl``/``.json``/``.csv``/``.parquet``) or a data set
``datasets.load_dataset`` finds (a Hub id or a directory of data files, with an optional ``:split``),
as a ``datasets.Dataset`` table."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.foundation.errors import UsageError, closest

if TYPE_CHECKING:
    import datasets

__all__ = ["BUILDERS", "is_dataset_name", "load_table", "missing_column"]

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name on the Hugging Face Hub


def load_table(path: str | Path) -> datasets.Dataset:
    """Read a local data file, or a data set by name, with ``datasets``.

    ``path`` is a file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``), or a data set that
    ``datasets.load_dataset`` finds: a Hugging Face Hub id or a local directory of data files, with an
    optional ``:split`` (``owner/name:test``; default ``train``).

    Raises:
        UsageError: the file is missing, empty, of an unsupported type, or unreadable; the data set
            cannot be loaded (offline, a misspelt id or split).
    """
    import datasets

    if is_dataset_name(str(path)):
        return _load_dataset(str(path))
    path = Path(path).expanduser()
    builder = BUILDERS.get(path.suffix.lower())
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the directory you run in, {Path.cwd()})"
        raise UsageError(f"data file not found: {path}{where}")
    if builder is None:
        raise UsageError(f"data file {path} has unsupported type {path.suffix!r}; use {', '.join(BUILDERS)}")
    if not path.read_bytes()[:4096].strip():
        raise UsageError(f"data file {path} is empty; it needs at least one example")
    try:
        rows = _json_rows(path) if builder == "json" else None
        if rows is not None:
            table = datasets.Dataset.from_dict({key: [row.get(key) for row in rows] for key in _keys(rows)})
        else:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as e:  # datasets wraps the parser's error; show the innermost one
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise UsageError(f"cannot read data file {path}: {str(cause).splitlines()[0]}") from e
    if len(table) == 0:
        raise UsageError(f"data file {path} is empty; it needs at least one example")
    return table


def _json_rows(path: Path) -> list[dict[str, Any]] | None:
    """The objects of a JSON Lines file, or of a JSON file holding a list of objects (None: another
    JSON layout, left to ``datasets``).

    Read with Python's ``json`` because ``datasets``' JSON reader (pyarrow) turns strings that look
    like dates into timestamps: an answer ``"2034-05-12"`` would train and score as
    ``"2034-05-12 00:00:00"``. Python's values keep the file's text.

    Raises:
        ValueError: a line that is not one JSON object (its number in the message).
    """
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        return data if isinstance(data, list) and all(isinstance(row, dict) for row in data) else None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"line {number}: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"line {number}: a JSON object is needed, not {type(row).__name__}")
            rows.append(row)
    return rows


def _keys(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of ``rows``, in the order first seen (a row without one gets None there)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def is_dataset_name(source: str) -> bool:
    """Whether ``source`` names a data set (a directory, or ``owner/name``, with an optional ``:split``)
    rather than a data file."""
    name = source.rsplit(":", 1)[0] if ":" in source else source
    if Path(source).expanduser().is_file() or Path(name).suffix.lower() in BUILDERS:
        return False
    return Path(name).expanduser().is_dir() or DATASET_ID.fullmatch(name) is not None


def _load_dataset(source: str) -> datasets.Dataset:
    import datasets

    name, _, split = source.partition(":") if ":" in source else (source, "", "train")
    try:
        table = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, an unknown id or split: datasets' own message, first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"cannot load data set {name!r} (split {split or 'train'!r}): {first}; without internet, "
            "pass a local file instead (--data FILE.jsonl)"
        ) from e
    if len(table) == 0:
        raise UsageError(f"data set {source!r} is empty; it needs at least one example")
    return table


def missing_column(column: str, columns: list[str], source: str) -> UsageError:
    """The error for a column ``source`` lacks: its columns, the closest one, how to map another."""
    return UsageError(
        f"column {column!r} not found in {source} (columns: {', '.join(columns)}){closest(column, columns)}; "
        "map yours with --prompt-column/--completion-column (or the other *_column keys)"
    )
