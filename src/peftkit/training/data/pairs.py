"""Preference data: rows of a prompt, a chosen and a rejected answer → tokenized pairs.

TRL's preference layout (column names mappable with ``prompt_column``, ``chosen_column``,
``rejected_column``):

- plain text: ``prompt``, ``chosen``, ``rejected`` strings (``prompt_template`` can build the prompt from
  any columns, as for SFT);
- chat messages: ``prompt`` a list of ``{"role", "content"}`` turns, ``chosen`` and ``rejected`` each a
  list holding one assistant turn;
- implicit prompt: no prompt column, ``chosen`` and ``rejected`` whole conversations that differ only in
  their last (assistant) turn.

The prompt is shared: each pair is ``prompt_ids`` (the prompt as the chat template renders it, ready for
the answer) and the two answers' tokens after it (``chosen_ids``, ``rejected_ids``), so the loss covers
the answers only. A pair longer than ``max_length`` (the prompt plus its longer answer) loses the middle
of its prompt, or the answers' ends when the prompt is too short for that (counted; a pair whose
answers become equal, or whose prompt alone is too long, is dropped).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.foundation.errors import UsageError
from peftkit.training.data.chats import DataFormat, encode, fill_template
from peftkit.training.data.tables import missing_column
from peftkit.training.data.tokenization import KEEP_TOKENS

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = ["shorten_pair", "to_pair_chats", "tokenize_pairs"]

Messages = list[dict[str, str]]


def to_pair_chats(table: datasets.Dataset, fmt: DataFormat, source: str = "the data") -> datasets.Dataset:
    """Rows → ``{"prompt": [turns], "chosen": [assistant turn], "rejected": [assistant turn]}``.

    Raises:
        UsageError: a missing ``chosen`` / ``rejected`` (or prompt) column, with the closest column; a
            row whose answers are the same or empty; conversations that differ before their last turn.
    """
    columns = list(table.column_names)
    for column in (fmt.chosen_column, fmt.rejected_column):
        if column not in columns:
            raise missing_column(column, columns, source)
    implicit = fmt.prompt_column not in columns and not fmt.prompt_template
    if implicit and _is_text(table[0][fmt.chosen_column]):
        raise missing_column(fmt.prompt_column, columns, source)

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        where = f"row {index + 1} of {source}"
        if implicit:
            prompt, chosen, rejected = _split_conversations(
                row[fmt.chosen_column], row[fmt.rejected_column], where
            )
        else:
            prompt = _prompt_turns(row, fmt, source)
            chosen = _answer_turn(row[fmt.chosen_column], fmt.chosen_column, where)
            rejected = _answer_turn(row[fmt.rejected_column], fmt.rejected_column, where)
        if fmt.system_prompt and (not prompt or prompt[0]["role"] != "system"):
            prompt = [{"role": "system", "content": fmt.system_prompt}, *prompt]
        if chosen[0]["content"].strip() == rejected[0]["content"].strip():
            raise UsageError(
                f"{where}: chosen and rejected are the same answer ({chosen[0]['content'][:60]!r}); a pair "
                "needs two different answers: fix or drop that row"
            )
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    return table.map(convert, with_indices=True, remove_columns=columns, keep_in_memory=True)


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _prompt_turns(row: dict[str, Any], fmt: DataFormat, source: str) -> Messages:
    if fmt.prompt_template:
        return [{"role": "user", "content": fill_template(fmt.prompt_template, row, source)}]
    prompt = row[fmt.prompt_column]
    if _is_text(prompt):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _answer_turn(value: Any, column: str, where: str) -> Messages:
    """An answer column's value (a string, or a list holding one assistant turn) as one assistant turn."""
    if _is_text(value):
        content = value
    elif isinstance(value, list) and len(value) == 1 and value[0].get("role") == "assistant":
        content = value[0]["content"]
    else:
        raise UsageError(
            f"{where}: {column} must be a string or a list of one assistant turn, not {str(value)[:80]!r}"
        )
    if not str(content).strip():
        raise UsageError(f"{where}: {column} is empty; a pair needs two non-empty answers")
    return [{"role": "assistant", "content": str(content)}]


def _split_conversations(chosen: Any, rejected: Any, where: str) -> tuple[Messages, Messages, Messages]:
    """TRL's implicit prompt: two conversations sharing every turn but their last (the answers)."""
    if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
        raise UsageError(f"{where}: without a prompt column, chosen and rejected must be conversations")
    turns = [[{"role": m["role"], "content": m["content"]} for m in side] for side in (chosen, rejected)]
    if turns[0][:-1] != turns[1][:-1]:
        raise UsageError(f"{where}: chosen and rejected differ before their last turn; give a prompt column")
    return (
        turns[0][:-1],
        _answer_turn([turns[0][-1]], "chosen", where),
        _answer_turn([turns[1][-1]], "rejected", where),
    )


def shorten_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int
) -> tuple[list[int], list[int], list[int]] | None:
    """Fit a pair into ``max_length`` tokens per sequence (the prompt plus its longer answer).

    The middle of the prompt goes first (its first and last ``KEEP_TOKENS`` stay, as for SFT); when the
    prompt is too short for that, the answers lose their ends.

    Returns:
        ``(prompt, chosen, rejected)``, or None when nothing is left to compare (the prompt alone is too
        long, or the cut answers are equal).
    """
    excess = len(prompt) + max(len(chosen), len(rejected)) - max_length
    if excess <= 0:
        return prompt, chosen, rejected
    end = len(prompt) - KEEP_TOKENS
    start = end - excess
    if start >= KEEP_TOKENS:
        return prompt[:start] + prompt[end:], chosen, rejected
    room = max_length - len(prompt)
    if room <= 0 or chosen[:room] == rejected[:room]:
        return None
    return prompt, chosen[:room], rejected[:room]


def tokenize_pairs(
    chats: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Pair chats → ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``targets`` (1: a pair),
    ``references`` (the two answers' texts), and the truncation counts.

    Raises:
        UsageError: the chat template renders a prompt differently alone than followed by its answer.
    """

    def run(row: dict[str, Any]) -> dict[str, Any]:
        answers = []
        prompt_ids: list[int] = []
        for side in ("chosen", "rejected"):
            input_ids, _, prompt_ids = encode(tokenizer, [*row["prompt"], *row[side]])
            answers.append(input_ids[len(prompt_ids) :])
        shortened = shorten_pair(prompt_ids, answers[0], answers[1], max_length)
        cut = shortened is None or shortened != (prompt_ids, answers[0], answers[1])
        prompt_ids, chosen_ids, rejected_ids = shortened or (prompt_ids, [], [])
        return {
            "prompt_ids": prompt_ids,
            "chosen_ids": chosen_ids,
            "rejected_ids": rejected_ids,
            "truncated": cut,
            "targets": 1,
            "references": [row["chosen"][0]["content"], row["rejected"][0]["content"]],
        }

    rows = chats.map(run, remove_columns=list(chats.column_names), keep_in_memory=True)
    kept = rows.filter(lambda row: len(row["chosen_ids"]) > 0, keep_in_memory=True)
    stats = {"examples": len(rows), "truncated": sum(rows["truncated"]), "dropped": len(rows) - len(kept)}
    return kept.remove_columns(["truncated"]), stats
