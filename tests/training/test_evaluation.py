"""peftkit.training.evaluation: the held-out scores against hand computations.

References: ROUGE-n F1 counted by hand on short sentences (no stemming involved), and token losses
from the tiny Llama's own logits row by row (``F.cross_entropy`` on whole float32 logits, no padding);
tolerance 1e-5 relative (batched, padded forwards sum in another order).
"""

from __future__ import annotations

import math

import datasets
import pytest
import torch
import torch.nn.functional as F

from peftkit.training.data import encode
from peftkit.training.evaluation import (
    evaluate,
    exact_match,
    headline_metric,
    length_batches,
    median_words,
    padding_tokens,
    rouge,
    text_loss,
)

from helpers.tiny_lm import build_model, build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(len(tokenizer), seed=0).eval()


def test_exact_match_ignores_surrounding_whitespace_and_takes_any_reference() -> None:
    predictions = [" Oslo ", "Lima", "Pune"]
    references = [["Oslo"], ["Quito", "Lima"], ["pune"]]
    assert exact_match(predictions, references) == pytest.approx(2 / 3)
    assert exact_match([], []) == 0.0


def test_rouge_is_the_f1_of_shared_ngrams_against_the_best_reference() -> None:
    scores = rouge(["the cat sat"], [["a dog ran", "the cat ran"]])
    # unigrams: 2 of 3 shared both ways -> F1 2/3; bigrams: "the cat" of 2 -> 1/2; LCS "the cat" -> 2/3
    assert scores == pytest.approx({"rouge1": 2 / 3, "rouge2": 1 / 2, "rougeL": 2 / 3})
    assert rouge(["a b", "x"], [["a b"], ["y"]])["rouge1"] == pytest.approx(0.5)  # the mean over rows


def test_auto_metric_is_exact_match_for_short_answers_and_rouge_for_long() -> None:
    short, long = [["one two"], ["three"]], [[" ".join(["word"] * 20)]]
    assert median_words(short) == 1.5 and median_words([]) == 0.0
    assert headline_metric("auto", "causal-lm", short) == "exact_match"
    assert headline_metric("auto", "causal-lm", long) == "rougeL"
    assert headline_metric("auto", "seq-cls", short) == "accuracy"
    assert headline_metric("rouge1", "causal-lm", short) == "rouge1"


def row_loss(model, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Summed next-token loss of one unpadded row over its labelled positions."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([input_ids])).logits[0].float()  # (seq, vocab)
    targets = torch.tensor(labels[1:])
    scored = targets != -100
    return F.cross_entropy(logits[:-1][scored], targets[scored], reduction="sum").item(), int(scored.sum())


def test_evaluate_loss_is_the_mean_over_every_answer_token(model, tokenizer) -> None:
    chats = [
        [
            {"role": "user", "content": "Ada Park is a surgeon" + " in Oslo" * i},
            {"role": "assistant", "content": "Ada"},
        ]
        for i in range(5)
    ]
    encoded = [encode(tokenizer, chat) for chat in chats]
    rows = datasets.Dataset.from_dict(
        {
            "input_ids": [ids for ids, _, _ in encoded],
            "labels": [labels for _, labels, _ in encoded],
            "prompt_ids": [prompt for _, _, prompt in encoded],
            "references": [["Ada"]] * 5,
        }
    )
    result = evaluate(model, tokenizer, rows, "causal-lm", batch_size=2, generate=False)
    sums = [row_loss(model, ids, labels) for ids, labels, _ in encoded]
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
    assert set(result) == {"loss", "perplexity", "padding_tokens"}
    assert result["padding_tokens"] == 0  # a causal LM scores packed rows: no padding
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    scored = evaluate(model, tokenizer, rows, "causal-lm", examples=2, max_new_tokens=3, batch_size=2)
    assert scored["scored"] == 2 and len(scored["samples"]) == 2 and scored["loss"] == result["loss"]
    assert {"exact_match", "rouge1", "rouge2", "rougeL"} <= set(scored)
    assert model.training is False


def test_text_loss_is_the_mean_next_token_loss_over_rows_of_the_text(model, tokenizer) -> None:
    text = "Ada Park, 36, has worked as a surgeon in Toronto for ten years. Bo Li paints in Lima."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = [ids[start : start + 8] for start in range(0, len(ids), 8)]
    sums = [row_loss(model, row, row) for row in rows if len(row) >= 2]
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
    assert text_loss(model, tokenizer, text, max_length=8, batch_size=3) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="at least two tokens"):
        text_loss(model, tokenizer, "", max_length=8)


def test_length_batches_group_similar_lengths_and_padding_is_counted_by_hand() -> None:
    lengths = [9, 2, 7, 3, 8, 2]
    batches = length_batches(lengths, 2)
    assert batches == [[1, 5], [3, 2], [4, 0]]  # lengths (2, 2), (3, 7), (8, 9)
    assert padding_tokens(lengths, batches) == 0 + 4 + 1
    in_order = [[0, 1], [2, 3], [4, 5]]  # (9, 2), (7, 3), (8, 2): 7 + 4 + 6
    assert padding_tokens(lengths, in_order) == 17
