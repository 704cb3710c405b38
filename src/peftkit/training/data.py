"""Training data on Hugging Face ``datasets``: local files → chats → tokenized, prompt-masked rows.

Files: ``.jsonl``/``.json``/``.csv``/``.parquet``, in one of three layouts (column names mappable):

- ``prompt_completion``: a prompt and its answer (``prompt_template`` can build the prompt from any
  columns, e.g. ``"Summarize:\\n{dialogue}"``);
- ``instruction``: ``instruction``, optional ``input``, ``output`` (the Alpaca layout);
- ``messages``: a list of ``{"role", "content"}`` chat turns.

Instead of a file, ``data`` may name a data set ``datasets.load_dataset`` finds (a Hub id or a
directory of data files) with an optional split: ``owner/name:train``.

Every row becomes a chat; the tokenizer's chat template renders it when it has one. Labels are -100
except on the assistant's turns, so the loss counts the completion only. Examples longer than
``max_length`` lose the middle of their prompt, or their end when the answer alone is too long
(counted; one left with no answer token is dropped). ``packing`` fills each row
with several whole examples.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from peftkit.foundation.errors import UsageError, closest
from peftkit.foundation.tasks import IGNORE_INDEX

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from peftkit.training.train_config import TrainConfig

__all__ = [
    "DataFormat",
    "PreparedData",
    "check_data",
    "collate",
    "data_files",
    "encode",
    "load_table",
    "prepare_data",
    "to_chats",
]

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name on the Hugging Face Hub
KEEP_TOKENS = 16  # truncation keeps a prompt's first and last this many tokens
Encoded = tuple[list[int], list[int], list[int]]  # (input_ids, labels, prompt_ids)


@dataclass(frozen=True)
class DataFormat:
    """How a table's rows become chats (see the module docstring for the layouts)."""

    layout: str = "auto"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    messages_column: str = "messages"
    prompt_template: str | None = None
    system_prompt: str | None = None
    reference_columns: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: TrainConfig) -> DataFormat:
        """The data settings of a :class:`~peftkit.training.train_config.TrainConfig`."""
        return cls(
            config.data_format,
            config.prompt_column,
            config.completion_column,
            config.instruction_column,
            config.input_column,
            config.output_column,
            config.messages_column,
            config.prompt_template,
            config.system_prompt,
            tuple(config.reference_columns or ()),
        )


@dataclass
class PreparedData:
    """Tokenized training and validation rows plus what happened on the way.

    ``train`` has ``input_ids`` and ``labels``; ``validation`` also ``prompt_ids`` (the prompt a model
    answers when scored by generation) and ``references`` (the accepted answers).
    """

    train: datasets.Dataset
    validation: datasets.Dataset | None
    stats: dict[str, int] = field(default_factory=dict)
    label_names: list[str] | None = None


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


def to_chats(table: datasets.Dataset, fmt: DataFormat, source: str = "the data") -> datasets.Dataset:
    """Rows → ``{"messages": [{"role", "content"}, ...], "references": [str, ...]}``.

    The references are the last assistant turn plus ``fmt.reference_columns``. When the completion
    column is missing but every reference column is there (e.g. DialogSum's test split has
    ``summary1..3``), the first reference is the completion.

    Raises:
        UsageError: no layout fits, a named column is missing (with the closest column), or the
            prompt template names a missing column.
    """
    columns = list(table.column_names)
    layout = _layout(fmt, columns)
    completion = fmt.completion_column
    if layout == "prompt_completion" and completion not in columns and fmt.reference_columns:
        completion = fmt.reference_columns[0]
    needed = {
        "messages": [fmt.messages_column],
        "instruction": [fmt.instruction_column, fmt.output_column],
        "prompt_completion": [completion] + ([] if fmt.prompt_template else [fmt.prompt_column]),
    }[layout] + list(fmt.reference_columns)
    for column in needed:
        if column not in columns:
            raise _missing_column(column, columns, source)

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        if layout == "messages":
            messages = [{"role": m["role"], "content": m["content"]} for m in row[fmt.messages_column]]
        else:
            if layout == "instruction":
                extra = row.get(fmt.input_column) or ""
                prompt = row[fmt.instruction_column] + (f"\n\n{extra}" if extra else "")
                answer = row[fmt.output_column]
            else:
                prompt = (
                    _fill(fmt.prompt_template, row, source) if fmt.prompt_template else row[fmt.prompt_column]
                )
                answer = row[completion]
            messages = [
                {"role": "user", "content": str(prompt)},
                {"role": "assistant", "content": str(answer)},
            ]
        if fmt.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": fmt.system_prompt})
        if not any(m["role"] == "assistant" for m in messages):
            raise UsageError(f"a row of {source} has no assistant turn to learn: {messages}")
        last = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
        extra_refs = [str(row[c]) for c in fmt.reference_columns if row[c] is not None]
        return {"messages": messages, "references": [last, *[r for r in extra_refs if r != last]]}

    return table.map(convert, remove_columns=columns, keep_in_memory=True)


def encode(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> Encoded:
    """Tokenize a chat: ``(input_ids, labels, prompt_ids)``.

    ``labels`` equal ``input_ids`` on assistant turns (with their end-of-turn tokens) and -100
    elsewhere; ``prompt_ids`` is everything before the last assistant turn, ready for generation.
    With a chat template, each assistant turn's span is found by rendering the chat up to it.

    Raises:
        UsageError: the chat template does not render a chat's prefix as a prefix of the whole chat.
    """
    if getattr(tokenizer, "chat_template", None):
        return _encode_templated(tokenizer, list(messages))
    return _encode_plain(tokenizer, list(messages))


def _encode_templated(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> Encoded:
    def render(turns: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        out = tokenizer.apply_chat_template(turns, add_generation_prompt=generation_prompt, return_dict=True)
        return list(out["input_ids"])

    input_ids = render(messages, False)
    labels = [IGNORE_INDEX] * len(input_ids)
    prompt_ids: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_ids = render(messages[:i], True)
        end = len(render(messages[: i + 1], False))
        if input_ids[: len(prompt_ids)] != prompt_ids:
            raise UsageError(
                "the tokenizer's chat template renders a conversation's beginning differently from the "
                "whole conversation, so prompt tokens cannot be masked; use a tokenizer without this quirk"
            )
        labels[len(prompt_ids) : end] = input_ids[len(prompt_ids) : end]
    return input_ids, labels, prompt_ids


def _encode_plain(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> Encoded:
    """No chat template: turns are joined by blank lines; each answer ends with the EOS token."""
    input_ids: list[int] = []
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        input_ids.append(tokenizer.bos_token_id)
    labels = [IGNORE_INDEX] * len(input_ids)
    prompt_ids: list[int] = []
    for message in messages:
        if message["role"] == "assistant":
            prompt_ids = list(input_ids)
            ids = tokenizer(message["content"], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids = [*ids, tokenizer.eos_token_id]
            input_ids += ids
            labels += ids
        else:
            ids = tokenizer(message["content"] + "\n\n", add_special_tokens=False)["input_ids"]
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
    return input_ids, labels, prompt_ids


def shorten(
    input_ids: list[int], labels: list[int], prompt_length: int, max_length: int
) -> tuple[list[int], list[int], list[int]]:
    """Cut an example to ``max_length`` tokens, keeping its answer when the prompt is long enough.

    Tokens are removed from the prompt just before its last ``KEEP_TOKENS`` (the end of the user turn
    and the template's assistant header), leaving its first ``KEEP_TOKENS`` too; a long dialogue then
    loses a middle stretch, not its summary. When the prompt is too short for that, the example is cut
    at the end.

    Returns:
        ``(input_ids, labels, prompt_ids)`` of at most ``max_length`` tokens.
    """
    excess = len(input_ids) - max_length
    end = prompt_length - KEEP_TOKENS
    start = end - excess
    if excess <= 0:
        return input_ids, labels, input_ids[:prompt_length]
    if start >= KEEP_TOKENS:
        input_ids = input_ids[:start] + input_ids[end:]
        labels = labels[:start] + labels[end:]
        return input_ids, labels, input_ids[: prompt_length - excess]
    return input_ids[:max_length], labels[:max_length], input_ids[: min(prompt_length, max_length)]


def tokenize(
    chats: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, task: str, max_length: int
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Chats → ``input_ids``, ``labels``, ``prompt_ids``, ``references`` (and the truncation counts).

    ``seq2seq-lm``: the encoder reads the prompt turns, ``labels`` are the answer's tokens.
    ``seq-cls`` rows are tokenized by :func:`tokenize_classification` instead.
    """

    def run(row: dict[str, Any]) -> dict[str, Any]:
        if task == "seq2seq-lm":
            prompt = "\n\n".join(m["content"] for m in row["messages"] if m["role"] != "assistant")
            prompt_ids = tokenizer(prompt)["input_ids"]
            labels = tokenizer(row["references"][0])["input_ids"]
            input_ids = prompt_ids
            cut = len(input_ids) > max_length or len(labels) > max_length
            input_ids, prompt_ids, labels = (
                input_ids[:max_length],
                prompt_ids[:max_length],
                labels[:max_length],
            )
        else:
            input_ids, labels, prompt_ids = encode(tokenizer, row["messages"])
            cut = len(input_ids) > max_length
            if cut:
                input_ids, labels, prompt_ids = shorten(input_ids, labels, len(prompt_ids), max_length)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "prompt_ids": prompt_ids,
            "truncated": cut,
            "targets": sum(label != IGNORE_INDEX for label in labels),
        }

    rows = chats.map(run, remove_columns=["messages"], keep_in_memory=True)
    truncated = sum(rows["truncated"])
    kept = rows.filter(lambda row: row["targets"] > 0, keep_in_memory=True)
    stats = {"examples": len(rows), "truncated": truncated, "dropped": len(rows) - len(kept)}
    return kept.remove_columns(["truncated"]), stats


def tokenize_classification(
    table: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    fmt: DataFormat,
    max_length: int,
    label_names: list[str] | None,
    source: str,
) -> tuple[datasets.Dataset, dict[str, int], list[str]]:
    """``seq-cls``: the prompt column is the text, the completion column the label (name or index)."""
    columns = list(table.column_names)
    for column in (fmt.prompt_column, fmt.completion_column):
        if column not in columns:
            raise _missing_column(column, columns, source)
    if label_names is None:
        label_names = sorted({str(v) for v in table[fmt.completion_column]}, key=_label_order)
    index = {name: i for i, name in enumerate(label_names)}

    def run(row: dict[str, Any]) -> dict[str, Any]:
        label = str(row[fmt.completion_column])
        if label not in index:
            raise UsageError(f"label {label!r} in {source} was not seen in training (labels: {label_names})")
        ids = tokenizer(str(row[fmt.prompt_column]))["input_ids"]
        return {
            "input_ids": ids[:max_length],
            "labels": index[label],
            "truncated": len(ids) > max_length,
            "targets": 1,
            "prompt_ids": ids[:max_length],
            "references": [label],
        }

    rows = table.map(run, remove_columns=columns, keep_in_memory=True)
    stats = {"examples": len(rows), "truncated": sum(rows["truncated"]), "dropped": 0}
    return rows.remove_columns(["truncated"]), stats, label_names


def pack(rows: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Fill rows of up to ``max_length`` tokens with whole examples, in order (no example is split).

    An example may attend to the earlier examples of its row (no attention reset), as in TRL's packing
    without position-id resets; its loss still covers its own answer only.
    """
    import datasets

    packed: dict[str, list[Any]] = {"input_ids": [], "labels": [], "targets": []}
    ids: list[int] = []
    labels: list[int] = []
    for row in rows:
        if ids and len(ids) + len(row["input_ids"]) > max_length:
            packed["input_ids"].append(ids)
            packed["labels"].append(labels)
            packed["targets"].append(sum(label != IGNORE_INDEX for label in labels))
            ids, labels = [], []
        ids = ids + row["input_ids"]
        labels = labels + row["labels"]
    if ids:
        packed["input_ids"].append(ids)
        packed["labels"].append(labels)
        packed["targets"].append(sum(label != IGNORE_INDEX for label in labels))
    return datasets.Dataset.from_dict(packed)


def collate(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding), each (batch, seq).

    Classification rows (an integer label) give ``labels`` of shape (batch,).
    """
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        attention_mask[i, : len(row["input_ids"])] = 1
    if isinstance(rows[0]["labels"], int):
        labels = torch.tensor([row["labels"] for row in rows])
    else:
        width_labels = max(len(row["labels"]) for row in rows)
        labels = torch.full((len(rows), width_labels), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            labels[i, : len(row["labels"])] = torch.tensor(row["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def check_data(config: TrainConfig) -> None:
    """Read the data files and check their columns on their first rows, without a tokenizer.

    Run before a model loads, so that bad data is reported at once.

    Raises:
        UsageError: as :func:`prepare_data`.
    """
    fmt = DataFormat.from_config(config)
    train_path, validation = data_files(config)
    files = [(train_path, dataclasses.replace(fmt, reference_columns=()))]
    if validation:
        files.append((validation, fmt))
    for path, file_fmt in files:
        head = load_table(path)
        head = head.select(range(min(8, len(head))))
        if config.task == "seq-cls":
            for column in (fmt.prompt_column, fmt.completion_column):
                if column not in head.column_names:
                    raise _missing_column(column, list(head.column_names), str(path))
        else:
            to_chats(head, file_fmt, str(path))


def prepare_data(config: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Load, convert, split, tokenize (and pack) the training and validation data of ``config``.

    ``config.data`` is a file or a bundled task name (``peftkit.training.tasks``), whose files and
    settings are used.

    Raises:
        UsageError: a missing, empty or unreadable file, a missing column, or too little data.
    """
    fmt = DataFormat.from_config(config)
    train_path, validation_path = data_files(config)
    table = load_table(train_path)
    validation = load_table(validation_path) if validation_path else None
    if validation is None and config.validation_split > 0:
        if len(table) < 2:
            raise UsageError(f"{train_path} has {len(table)} example; validation_split needs at least 2")
        split = table.train_test_split(test_size=config.validation_split, seed=config.seed)
        table, validation = split["train"], split["test"]
    if validation is not None and config.validation_rows:
        validation = validation.select(range(min(config.validation_rows, len(validation))))

    if config.task == "seq-cls":
        train, stats, names = tokenize_classification(
            table, tokenizer, fmt, config.max_length, None, str(train_path)
        )
        val = None
        if validation is not None:
            val, _, _ = tokenize_classification(
                validation, tokenizer, fmt, config.max_length, names, str(validation_path or train_path)
            )
        return PreparedData(train, val, stats, names)

    train_fmt = dataclasses.replace(fmt, reference_columns=())  # references matter for scoring only
    train_chats = to_chats(table, train_fmt, str(train_path))
    train, stats = tokenize(train_chats, tokenizer, config.task, config.max_length)
    val = None
    if validation is not None:
        val_chats = to_chats(validation, fmt, str(validation_path or train_path))
        val, _ = tokenize(val_chats, tokenizer, config.task, config.max_length)
    if len(train) == 0:
        raise UsageError(
            f"no example of {train_path} has an answer token left within max_length={config.max_length}"
        )
    train = train.remove_columns([c for c in ("prompt_ids", "references") if c in train.column_names])
    if config.packing:
        if config.task != "causal-lm":
            raise UsageError(f"packing works for task causal-lm only, not {config.task!r}; drop --packing")
        train = pack(train, config.max_length)
        stats["packed_rows"] = len(train)
    return PreparedData(train, val, stats)


def data_files(config: TrainConfig) -> tuple[Path, Path | None]:
    """The training file and the held-out file (None: split off the training rows) of ``config``.

    Raises:
        UsageError: ``data`` is empty (a directory without ``train_config.yaml`` records none).
    """
    from peftkit.training.tasks import builtin_task

    if not config.data:
        raise UsageError("no data given: set data to a file or a bundled task name (e.g. person-json)")
    task = builtin_task(config.data)
    validation = config.validation_data or (task.validation if task else None)
    return (task.train if task else Path(config.data)), (Path(validation) if validation else None)


def median_words(references: Sequence[Sequence[str]]) -> float:
    """The median word count of the first reference of each row."""
    return statistics.median(len(refs[0].split()) for refs in references) if references else 0.0


def _layout(fmt: DataFormat, columns: list[str]) -> str:
    """The layout: as set, else messages or instruction when their columns exist, else prompt/completion."""
    if fmt.layout != "auto":
        return fmt.layout
    if fmt.messages_column in columns:
        return "messages"
    if fmt.instruction_column in columns and fmt.output_column in columns:
        return "instruction"
    return "prompt_completion"


def _missing_column(column: str, columns: list[str], source: str) -> UsageError:
    return UsageError(
        f"column {column!r} not found in {source} (columns: {', '.join(columns)}){closest(column, columns)}; "
        "map yours with --prompt-column/--completion-column (or the other *_column keys)"
    )


def _fill(template: str, row: dict[str, Any], source: str) -> str:
    try:
        return template.format(**row)
    except KeyError as e:
        raise UsageError(
            f"prompt_template names {{{e.args[0]}}}, which is not a column of {source} "
            f"(columns: {', '.join(row)}){closest(str(e.args[0]), row)}"
        ) from e


def _label_order(name: str) -> tuple[int, Any]:
    """Numeric labels in numeric order, then names alphabetically."""
    try:
        return (0, int(name))
    except ValueError:
        return (1, name)
