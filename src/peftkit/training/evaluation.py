"""Scoring a model on held-out rows: loss/perplexity, exact match, ROUGE-1/2/L, accuracy.

The loss is the mean cross-entropy over answer tokens (prompt tokens masked). Generation tasks are also
scored on what the model writes greedily for each prompt: exact match (after stripping surrounding
whitespace, against any reference) and ROUGE F1 (``rouge-score``, stemmed; the best over the
references, as in DialogSum's evaluation).

Little is computed on padding: a causal LM that runs packed rows scores its loss on packed rows (each
example attending only to itself, no padding at all), other models on rows batched by length; prompts
are generated in batches of similar lengths (and the answers put back in order). The padding tokens
computed are reported (``padding_tokens``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.objectives.packed import packing_support
from peftkit.objectives.tokens import forward_logits, loss_sum, token_loss_sum
from peftkit.training.data import collate, collate_packed
from peftkit.training.data.packing import pack

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "classify",
    "evaluate",
    "exact_match",
    "generate_answers",
    "headline_metric",
    "length_batches",
    "median_words",
    "padding_tokens",
    "rouge",
    "text_loss",
]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
ANSWER_MARGIN = 8  # generated tokens beyond the longest reference: room to overshoot, and be scored wrong
GENERATION_BATCH = 32  # prompts generated together (batches of similar lengths)
SHORT_ANSWER_WORDS = 16  # "auto" scores answers of up to this many words (median) by exact match


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """The fraction of predictions equal to one of their references (surrounding whitespace ignored)."""
    if not predictions:
        return 0.0
    hits = sum(
        p.strip() in {r.strip() for r in refs} for p, refs in zip(predictions, references, strict=True)
    )
    return hits / len(predictions)


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (stemmed), each row scored against its best reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references, strict=True):
        scores = scorer.score_multi(list(refs), prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / max(len(predictions), 1) for name, total in totals.items()}


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    task: str,
    max_new_tokens: int,
    batch_size: int = GENERATION_BATCH,
    progress: Callable[[int], Any] | None = None,
) -> list[str]:
    """Greedy answers to tokenized prompts (left-padded for decoder-only models), in batches of prompts
    of similar lengths.

    Args:
        prompts: token ids of each prompt (any lengths).
        progress: called with the number of prompts answered after each batch (a progress bar's
            ``update``).

    Returns:
        The answers, in the order of ``prompts``.
    """
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    answers: dict[int, str] = {}
    for members in length_batches([len(p) for p in prompts], batch_size):
        chunk = [list(prompts[i]) for i in members]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(chunk):
            if task == "seq2seq-lm":  # the encoder reads right-padded input
                input_ids[i, : len(ids)], attention_mask[i, : len(ids)] = torch.tensor(ids), 1
            else:  # a decoder continues from the last position, so pad on the left
                input_ids[i, width - len(ids) :], attention_mask[i, width - len(ids) :] = torch.tensor(ids), 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            use_cache=True,
        )  # (batch, width + new) for decoders, (batch, new) for encoder-decoders
        new_tokens = output if task == "seq2seq-lm" else output[:, width:]
        for i, row in zip(members, new_tokens, strict=True):
            answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(chunk))
    return [answers[i] for i in range(len(prompts))]


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of ``lengths`` sorted by length (stable), cut into batches of ``batch_size``: rows of
    similar lengths together, so padding them to the longest costs little."""
    by_length = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [by_length[start : start + batch_size] for start in range(0, len(by_length), batch_size)]


def padding_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """The padding tokens of ``batches`` (indices into ``lengths``), each padded to its longest row."""
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches if b)


def median_words(references: Sequence[Sequence[str]]) -> float:
    """The median word count of the first reference of each row."""
    return statistics.median(len(refs[0].split()) for refs in references) if references else 0.0


@torch.no_grad()
def classify(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[int]:
    """The class a sequence classifier gives each text, tokenized as ``seq-cls`` training does (the
    text alone), one text at a time (no padding to get wrong).

    Returns:
        one class index per text.
    """
    device = next(model.parameters()).device
    classes = []
    for text in texts:
        input_ids = torch.tensor([tokenizer(text)["input_ids"]], device=device)  # (1, seq)
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits  # (1, classes)
        classes.append(int(logits[0].argmax()))
    return classes


def headline_metric(metric: str, task: str, references: Sequence[Sequence[str]]) -> str:
    """Resolve ``metric="auto"``: accuracy for ``seq-cls``, exact match for short answers, else rougeL."""
    if metric != "auto":
        return metric
    if task == "seq-cls":
        return "accuracy"
    return "exact_match" if median_words(references) <= SHORT_ANSWER_WORDS else "rougeL"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: datasets.Dataset,
    task: str,
    examples: int = 50,
    max_new_tokens: int = 0,
    batch_size: int = 16,
    generate: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss and perplexity on all ``rows``; accuracy (``seq-cls``) or, on the first ``examples`` rows,
    exact match and ROUGE of greedy answers.

    Args:
        rows: tokenized validation rows (``input_ids``, ``labels``, ``prompt_ids``, ``references``).
        max_new_tokens: 0 → the longest reference's token count + ``ANSWER_MARGIN``.
        generate: False skips generation (loss only).
        progress: show a progress bar (tqdm, on stderr) over the rows scored, then those generated.

    Returns:
        ``{"loss", "perplexity", "padding_tokens", ...}``; with generation also ``"scored"`` (rows
        generated), ``"prompt_padding_tokens"`` (the prompts' padding in their generation batches)
        and ``"samples"``, up to three ``{"answer", "reference"}``.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    generated = min(examples, len(rows)) if generate and task != "seq-cls" else 0
    bar = tqdm(total=len(rows) + generated, desc="eval: loss", unit="row", disable=not progress)
    try:
        result = _loss_scores(model, tokenizer, rows, task, batch_size, bar)
        if generated > 0:
            bar.set_description("eval: generating")
            scored = rows.select(range(generated))
            result.update(_generation_scores(model, tokenizer, scored, task, max_new_tokens, bar))
    finally:
        bar.close()
        model.train(was_training)
    return result


def _loss_scores(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: datasets.Dataset,
    task: str,
    batch_size: int,
    bar: Any,
) -> dict[str, Any]:
    """Loss and perplexity over all ``rows`` (and accuracy for ``seq-cls``), ``batch_size`` rows at a
    time: packed (a causal LM that runs packed rows) or padded in order of length."""
    device = next(model.parameters()).device
    if task == "causal-lm" and len(rows) > 0 and packing_support(model) is None:
        return _packed_loss(model, rows, batch_size, bar)
    pad_id = pad_token_id(tokenizer)
    total = count = 0.0
    correct = padding = 0
    for members in length_batches([len(ids) for ids in rows["input_ids"]], batch_size):
        chunk = rows.select(members)
        batch = {k: v.to(device) for k, v in collate(list(chunk), pad_id).items()}
        logits = forward_logits(model, batch, task)
        batch_loss, batch_count = token_loss_sum(logits, batch["labels"], task)
        total += batch_loss.item()
        count += batch_count.item()
        padding += int((batch["attention_mask"] == 0).sum())
        if task == "seq-cls":
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        bar.update(len(chunk))
    result = _loss_result(total, count, padding)
    if task == "seq-cls":
        result["accuracy"] = correct / max(len(rows), 1)
    return result


def _packed_loss(model: nn.Module, rows: datasets.Dataset, batch_size: int, bar: Any) -> dict[str, Any]:
    """Loss and perplexity of a causal LM over ``rows`` packed into rows as long as the longest, each
    example attending only to itself (no padding is computed)."""
    device = next(model.parameters()).device
    packed = pack(rows.select_columns(["input_ids", "labels"]), max(len(ids) for ids in rows["input_ids"]))
    total = count = 0.0
    for start in range(0, len(packed), batch_size):
        chunk = packed.select(range(start, min(start + batch_size, len(packed))))
        batch = {k: v.to(device) for k, v in collate_packed(list(chunk)).items()}
        batch_loss, batch_count = loss_sum(model, batch, "causal-lm")
        total += batch_loss.item()
        count += batch_count.item()
        bar.update(sum(len(lengths) for lengths in chunk["lengths"]))
    return _loss_result(total, count, 0)


def _loss_result(total: float, count: float, padding: int) -> dict[str, Any]:
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "padding_tokens": padding}


def _generation_scores(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    scored: datasets.Dataset,
    task: str,
    max_new_tokens: int,
    bar: Any,
) -> dict[str, Any]:
    """Exact match and ROUGE of greedy answers to ``scored``'s prompts, and three samples."""
    references = scored["references"]
    if max_new_tokens <= 0:
        longest = max(len(tokenizer(r[0], add_special_tokens=False)["input_ids"]) for r in references)
        max_new_tokens = longest + ANSWER_MARGIN
    prompts = scored["prompt_ids"]
    answers = generate_answers(model, tokenizer, prompts, task, max_new_tokens, GENERATION_BATCH, bar.update)
    lengths = [len(p) for p in prompts]
    return {
        "prompt_padding_tokens": padding_tokens(lengths, length_batches(lengths, GENERATION_BATCH)),
        "exact_match": exact_match(answers, references),
        **rouge(answers, references),
        "scored": len(answers),
        "samples": [
            {"answer": a, "reference": r[0]} for a, r in zip(answers[:3], references[:3], strict=True)
        ],
    }


@torch.no_grad()
def text_loss(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    max_length: int = 256,
    batch_size: int = 8,
) -> float:
    """Mean next-token loss of a causal language model over a plain ``text``.

    The text is tokenized once (no special tokens) and cut into rows of ``max_length`` tokens (the last
    one shorter); every token but each row's first is predicted. ``peftkit compare`` measures forgetting
    with it: the change of this loss on general text the task did not train on.

    Raises:
        ValueError: a text of fewer than two tokens.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError("text_loss needs a text of at least two tokens")
    rows = [ids[start : start + max_length] for start in range(0, len(ids), max_length)]
    rows = [row for row in rows if len(row) >= 2]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    try:
        for start in range(0, len(rows), batch_size):
            chunk = [{"input_ids": row, "labels": row} for row in rows[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id(tokenizer)).items()}
            summed, counted = loss_sum(model, batch, "causal-lm")
            total += summed.item()
            count += counted.item()
    finally:
        model.train(was_training)
    return total / count


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its EOS id, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
