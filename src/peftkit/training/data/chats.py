"""Rows of a table as chats, and chats as tokens with the answer's labels.

A table's rows take one of three layouts (column names mappable, see :class:`DataFormat`):

- ``prompt_completion``: a prompt and its answer (``prompt_template`` can build the prompt from any
  columns, e.g. ``"Summarize:\\n{dialogue}"``);
- ``instruction``: ``instruction``, optional ``input``, ``output`` (the Alpaca layout);
- ``messages``: a list of ``{"role", "content"}`` chat turns.

Every row becomes a chat (:func:`to_chats`); :func:`encode` renders it with the tokenizer's chat
template when it has one. Labels are -100 except on the assistant's turns, so the loss counts the
completion only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftkit.foundation.errors import UsageError, closest
from peftkit.foundation.tasks import IGNORE_INDEX
from peftkit.training.data.tables import missing_column

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from peftkit.training.train_config import TrainConfig

__all__ = ["DataFormat", "Encoded", "encode", "to_chats"]

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
            raise missing_column(column, columns, source)

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


def _layout(fmt: DataFormat, columns: list[str]) -> str:
    """The layout: as set, else messages or instruction when their columns exist, else prompt/completion."""
    if fmt.layout != "auto":
        return fmt.layout
    if fmt.messages_column in columns:
        return "messages"
    if fmt.instruction_column in columns and fmt.output_column in columns:
        return "instruction"
    return "prompt_completion"


def _fill(template: str, row: dict[str, Any], source: str) -> str:
    try:
        return template.format(**row)
    except KeyError as e:
        raise UsageError(
            f"prompt_template names {{{e.args[0]}}}, which is not a column of {source} "
            f"(columns: {', '.join(row)}){closest(str(e.args[0]), row)}"
        ) from e
