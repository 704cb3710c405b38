"""Chats as model inputs: tokenized, prompt-masked, truncated rows (and classification rows)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from peftkit.foundation.errors import UsageError
from peftkit.foundation.tasks import IGNORE_INDEX
from peftkit.training.data.chats import DataFormat, encode
from peftkit.training.data.tables import missing_column

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = ["KEEP_TOKENS", "ordered_labels", "shorten", "tokenize", "tokenize_classification"]

KEEP_TOKENS = 16  # truncation keeps a prompt's first and last this many tokens


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
            "targets": sum(label != IGNORE_INDEX for label in _scored(labels, task)),
        }

    rows = chats.map(run, remove_columns=["messages"], keep_in_memory=True)
    truncated = sum(rows["truncated"])
    kept = rows.filter(lambda row: row["targets"] > 0, keep_in_memory=True)
    stats = {"examples": len(rows), "truncated": truncated, "dropped": len(rows) - len(kept)}
    return kept.remove_columns(["truncated"]), stats


def _scored(labels: list[int], task: str) -> list[int]:
    """The labels a loss scores: a causal LM never predicts its first token (labels line up with the
    next token), a decoder's labels are all predicted."""
    return labels if task == "seq2seq-lm" else labels[1:]


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
            raise missing_column(column, columns, source)
    if label_names is None:
        label_names = ordered_labels(table[fmt.completion_column])
    index = {name: i for i, name in enumerate(label_names)}

    def run(row: dict[str, Any]) -> dict[str, Any]:
        label = str(row[fmt.completion_column])
        if label not in index:
            raise UsageError(
                f"label {label!r} in {source} is not one of the run's labels {label_names} (the training "
                "rows' labels, unless set with labels)"
            )
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


def ordered_labels(values: Iterable[Any]) -> list[str]:
    """The distinct labels among ``values`` as class names in id order: numbers in numeric order, then
    names alphabetically."""
    return sorted({str(v) for v in values}, key=_label_order)


def _label_order(name: str) -> tuple[int, Any]:
    """Numeric labels in numeric order, then names alphabetically."""
    try:
        return (0, int(name))
    except ValueError:
        return (1, name)
