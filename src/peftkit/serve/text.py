"""An answer's text as its tokens arrive: incremental decoding and stop strings, O(new tokens) a step.

:class:`IncrementalText` decodes a short window of the latest tokens, not the whole answer (vLLM's
scheme): the text of ``tokens[start:]`` less that of ``tokens[start:read]`` is what the new tokens
add, the window then moving on to begin where the last piece began; a window that ends in U+FFFD (the
first bytes of a character whose last bytes are still to come) adds nothing yet. For byte-level BPE and
SentencePiece tokenizers the pieces add up to ``tokenizer.decode(tokens, skip_special_tokens=True,
clean_up_tokenization_spaces=False)``.
:class:`StopScanner` finds stop strings in what arrives, holding back a tail that may still become
one; neither looks at text already sent.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IncrementalText", "StopScanner"]


class IncrementalText:
    """The text of a growing list of tokens, one piece per call.

    Args:
        tokenizer: a transformers tokenizer (its ``decode``).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._start = 0  # the decoded window begins here
        self._read = 0  # tokens whose text was given out

    def add(self, token: int) -> str:
        """Append ``token``; the text it completes (empty while a character is incomplete)."""
        self.tokens.append(token)
        before = self._decode(self.tokens[self._start : self._read])
        after = self._decode(self.tokens[self._start :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._start, self._read = self._read, len(self.tokens)  # the next window: from these tokens on
        return after[len(before) :]

    def rest(self) -> str:
        """What the tokens hold that :meth:`add` has not given out: at the end of an answer, the U+FFFD
        of a character left incomplete (as ``decode`` of the whole answer shows it)."""
        before = self._decode(self.tokens[self._start : self._read])
        after = self._decode(self.tokens[self._start :])
        self._start, self._read = self._read, len(self.tokens)
        return after[len(before) :] if len(after) > len(before) else ""

    def _decode(self, tokens: list[int]) -> str:
        if not tokens:
            return ""
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class StopScanner:
    """Cuts an answer at the first stop string, across the pieces it arrives in.

    Args:
        stops: the request's stop strings (non-empty).
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._held = ""  # text received, not yet released: it may be the start of a stop string
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Take the next piece of the answer; the text that can be sent now. After a stop string is
        found (:attr:`stopped`), the text before it and nothing more."""
        if self.stopped:
            return ""
        text = self._held + piece
        found = [at for at in (text.find(stop) for stop in self.stops) if at >= 0]
        if found:
            self.stopped = True
            self._held = ""
            return text[: min(found)]
        keep = self._partial_stop_length(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held-back tail, at the end of an answer that found no stop string."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held

    def _partial_stop_length(self, text: str) -> int:
        """The longest end of ``text`` that is the beginning of a stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
