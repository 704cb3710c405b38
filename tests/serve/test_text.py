"""Incremental decoding and stop strings: the pieces add up to the whole answer's decode (checked against
``tokenizer.decode`` over random and multi-byte token sequences), stop strings are found across pieces."""

from __future__ import annotations

import random

import pytest

from peftkit.serve.text import IncrementalText, StopScanner

from helpers.tiny_lm import build_tokenizer


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    return build_tokenizer()


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    text = IncrementalText(tokenizer)
    return [text.add(token) for token in ids] + [text.rest()]


def test_the_pieces_of_random_token_sequences_add_up_to_the_whole_decode(byte_level_tokenizer) -> None:
    """Random ids include partial UTF-8 bytes: a piece is held back until its character is complete,
    and an incomplete one at the end comes out as ``decode`` shows it (U+FFFD)."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(byte_level_tokenizer)) for _ in range(rng.randrange(1, 30))]
        whole = byte_level_tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert "".join(_pieces(byte_level_tokenizer, ids)) == whole


def test_multi_byte_characters_come_out_whole(byte_level_tokenizer) -> None:
    text = "héllo wörld — 日本語 🎉 ok"
    ids = byte_level_tokenizer(text, add_special_tokens=False).input_ids
    pieces = _pieces(byte_level_tokenizer, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some tokens completed no character alone


def test_each_step_decodes_a_short_window_not_the_whole_answer(byte_level_tokenizer) -> None:
    """O(new tokens) a step: the longest list ``decode`` sees stays small however long the answer."""
    seen: list[int] = []

    class Counting:
        def decode(self, tokens, **kwargs):
            seen.append(len(tokens))
            return byte_level_tokenizer.decode(tokens, **kwargs)

    ids = byte_level_tokenizer(
        "Alice is 30 years old and lives in Paris. " * 20, add_special_tokens=False
    ).input_ids
    assert len(ids) > 150
    text = IncrementalText(Counting())
    "".join(text.add(token) for token in ids)
    assert max(seen) <= 4


@pytest.mark.parametrize(
    ("pieces", "stops", "sent", "stopped"),
    [
        (["hello wor", "ld and more"], ("world",), "hello ", True),
        (["hel", "lo"], ("x", "ll"), "he", True),
        (["hello"], ("x",), "hello", False),
        (["a.b."], (".", "b"), "a", True),
        (["abcE", "N", "D!"], ("END",), "abc", True),
        (["abcE", "X"], ("END",), "abcEX", False),
    ],
)
def test_stop_strings_are_found_across_pieces(pieces, stops, sent, stopped) -> None:
    scanner = StopScanner(stops)
    out = "".join(scanner.feed(piece) for piece in pieces)
    out += scanner.flush()
    assert out == sent and scanner.stopped == stopped


def test_a_possible_stop_start_is_held_back_until_it_is_decided() -> None:
    scanner = StopScanner(("world",))
    assert scanner.feed("hello wo") == "hello "  # "wo" may start "world"
    assert scanner.feed("ndrous") == "wondrous"
    assert scanner.feed("!") == "!"
