"""A run's data, ready to train on: its files read, checked, split, tokenized (:func:`prepare_data`), and
packed where packing applies and pays (:func:`pack_training_rows`)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.foundation.errors import UsageError
from peftkit.training.data.chats import DataFormat, to_chats
from peftkit.training.data.packing import pack, padding_free
from peftkit.training.data.pairs import to_pair_chats, tokenize_pairs
from peftkit.training.data.tables import load_table, missing_column
from peftkit.training.data.tokenization import ordered_labels, tokenize, tokenize_classification

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from peftkit.training.train_config import TrainConfig

__all__ = [
    "PACKING_PAYS_BELOW",
    "PreparedData",
    "check_data",
    "data_files",
    "pack_training_rows",
    "packing_blocker",
    "padded_fill",
    "prepare_data",
    "with_labels",
]

PACKING_PAYS_BELOW = 0.9  # packing is on by default when padded batches would be less full than this


@dataclass
class PreparedData:
    """Tokenized training and validation rows plus what happened on the way.

    ``train`` has ``input_ids``, ``labels`` and ``targets`` (packed: also ``lengths`` and ``examples``,
    see :func:`~peftkit.training.data.packing.pack`); ``validation`` also ``prompt_ids`` (the prompt a
    model answers when scored by generation) and ``references`` (the accepted answers). ``packing``
    says whether the rows are packed, and why (or why not); ``padding_free``: packed one example per
    row, so that a batch is its examples laid end to end. Preference pairs: ``prompt_ids``,
    ``chosen_ids``, ``rejected_ids`` (and in ``validation`` ``references``: the chosen and the rejected
    answer's text).
    """

    train: datasets.Dataset
    validation: datasets.Dataset | None
    stats: dict[str, int] = field(default_factory=dict)
    label_names: list[str] | None = None
    packed: bool = False
    padding_free: bool = False
    packing: str = ""

    @property
    def lengths(self) -> list[int]:
        """Tokens in each training row."""
        return [len(ids) for ids in self.train["input_ids"]]


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
                    raise missing_column(column, list(head.column_names), str(path))
        elif config.objective != "sft":
            to_pair_chats(head, file_fmt, str(path))
        else:
            to_chats(head, file_fmt, str(path))


def prepare_data(config: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Load, convert, split and tokenize the training and validation data of ``config`` (one example per
    row; :func:`pack_training_rows` packs them).

    ``config.data`` is a file or a bundled task name (``peftkit.training.tasks``), whose files and
    settings are used.

    Raises:
        UsageError: a missing, empty or unreadable file, a missing column, or too little data.
    """
    fmt = DataFormat.from_config(config)
    train_path, validation_path = data_files(config)
    table, validation = _tables(config, train_path, validation_path)

    if config.objective != "sft":
        return _prepare_pairs(config, tokenizer, fmt, (table, train_path), (validation, validation_path))
    if config.task == "seq-cls":
        train, stats, names = tokenize_classification(
            table, tokenizer, fmt, config.max_length, config.labels, str(train_path)
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
    return PreparedData(train, val, stats)


def _prepare_pairs(
    config: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    fmt: DataFormat,
    train: tuple[datasets.Dataset, Path],
    validation: tuple[datasets.Dataset | None, Path | None],
) -> PreparedData:
    """Preference pairs, training and held-out (every row of the data is checked, not only the first)."""
    (table, train_path), (held_out, validation_path) = train, validation
    rows, stats = tokenize_pairs(to_pair_chats(table, fmt, str(train_path)), tokenizer, config.max_length)
    if len(rows) == 0:
        raise UsageError(
            f"no pair of {train_path} fits max_length={config.max_length} with its answers apart"
        )
    val = None
    if held_out is not None:
        source = str(validation_path or train_path)
        val, _ = tokenize_pairs(to_pair_chats(held_out, fmt, source), tokenizer, config.max_length)
    return PreparedData(rows.remove_columns(["references"]), val, stats)


def packing_blocker(config: TrainConfig, model: Any, method_config: Any) -> str | None:
    """Why ``config``'s run cannot pack its rows exactly, or None when it can.

    Packing needs a causal-LM task trained on its tokens (preference pairs are not packed), a method
    that leaves the sequence as it is (soft prompts put virtual tokens in front of each row, not of
    each example) and a model that runs packed rows (:func:`peftkit.objectives.packed.packing_support`).
    """
    from peftkit.methods.soft_prompt import SoftPromptConfig
    from peftkit.objectives.packed import packing_support

    if config.task != "causal-lm":
        return f"task {config.task!r} is not causal-lm"
    if config.objective != "sft":
        return f"objective {config.objective!r} trains on pairs, not packed rows"
    if isinstance(method_config, SoftPromptConfig):
        return f"method {config.method!r} puts virtual tokens in front of each row"
    return packing_support(model)


def pack_training_rows(data: PreparedData, config: TrainConfig, blocker: str | None) -> PreparedData:
    """``data`` with its training rows packed when ``config.packing`` asks for it or, unset, when
    packing applies (``blocker`` None: see :func:`packing_blocker`) and pays (padded batches of the
    run's ``batch_size`` would be less than :data:`PACKING_PAYS_BELOW` full); ``config.padding_free``
    wins over ``packing``: packed rows of one example each (batches laid end to end, see
    :func:`~peftkit.training.data.packing.padding_free`). ``data.packing`` says which, and why.

    Raises:
        UsageError: ``packing`` or ``padding_free`` asked for where ``blocker`` says it cannot apply.
    """
    if config.padding_free:
        return _padding_free_rows(data, config, blocker)
    if config.packing is False:
        return dataclasses.replace(data, packing="off (--no-packing)")
    if blocker is not None:
        if config.packing:
            raise UsageError(f"packing cannot apply here: {blocker}; drop --packing (or use --no-packing)")
        return dataclasses.replace(data, packing=f"off ({blocker})")
    fill = padded_fill(data.lengths, config.batch_size, config.seed)
    if config.packing is None and fill >= PACKING_PAYS_BELOW:
        return dataclasses.replace(
            data, packing=f"off (padded batches would be {fill:.0%} full; --packing packs anyway)"
        )
    packed = pack(data.train, config.max_length)
    stats = {**data.stats, "packed_rows": len(packed)}
    row_fill = sum(data.lengths) / (len(packed) * config.max_length)
    note = f"padded batches would be {fill:.0%} full; packed rows are {row_fill:.0%} full"
    return dataclasses.replace(data, train=packed, stats=stats, packed=True, packing=f"on ({note})")


def _padding_free_rows(data: PreparedData, config: TrainConfig, blocker: str | None) -> PreparedData:
    if blocker is not None:
        raise UsageError(f"padding-free batches cannot apply here: {blocker}; drop --padding-free")
    fill = padded_fill(data.lengths, config.batch_size, config.seed)
    note = f"padding-free: each batch's examples end to end (padded batches would be {fill:.0%} full)"
    rows, stats = padding_free(data.train), {**data.stats, "packed_rows": len(data.train)}
    return dataclasses.replace(data, train=rows, stats=stats, packed=True, padding_free=True, packing=note)


def padded_fill(lengths: Sequence[int], batch_size: int, seed: int) -> float:
    """The share of real tokens in padded batches of ``batch_size`` rows drawn in a seeded random order
    (each batch padded to its longest row); 1.0 for no rows."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        real += sum(batch)
        padded += len(batch) * max(batch)
    return real / padded if padded else 1.0


def with_labels(config: TrainConfig) -> TrainConfig:
    """``config`` with ``labels`` set for ``seq-cls``: the training rows' labels when unset (numbers in
    numeric order, then names A-Z); other tasks' configs unchanged. The classification head gets one
    output per label, and ``id2label`` names them.

    Raises:
        UsageError: as :func:`prepare_data` (a missing file or column).
    """
    if config.task != "seq-cls" or config.labels:
        return config
    train_path, validation_path = data_files(config)
    table, _ = _tables(config, train_path, validation_path)
    column = config.completion_column
    if column not in table.column_names:
        raise missing_column(column, list(table.column_names), str(train_path))
    labels = ordered_labels(table[column])
    if len(labels) < 2:
        raise UsageError(
            f"the training rows of {train_path} have {len(labels)} label ({labels}) in column {column!r}; "
            "a classifier needs two or more"
        )
    return config.replace(labels=labels)


def _tables(
    config: TrainConfig, train_path: Path, validation_path: Path | None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The training rows and the held-out rows (a seeded split of the training file unless given)."""
    table = load_table(train_path)
    validation = load_table(validation_path) if validation_path else None
    if validation is None and config.validation_split > 0:
        if len(table) < 2:
            raise UsageError(f"{train_path} has {len(table)} example; validation_split needs at least 2")
        split = table.train_test_split(test_size=config.validation_split, seed=config.seed)
        table, validation = split["train"], split["test"]
    if validation is not None and config.validation_rows:
        validation = validation.select(range(min(config.validation_rows, len(validation))))
    return table, validation


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
