"""What one request, and one connection, may ask of the server (no torch here: ``--help`` reads it)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BYTES_PER_PROMPT_TOKEN",
    "GREEDY_BELOW",
    "MAX_JSON_DEPTH",
    "MAX_STOPS",
    "MAX_STOP_CHARS",
    "REQUEST_LIMITS",
    "SEED_RANGE",
    "TOP_P_MIN",
    "ServeLimits",
]

#: Temperatures below this are greedy: dividing logits by a tiny temperature overflows float32, and the
#: distribution it asks for is the argmax's anyway.
GREEDY_BELOW = 1e-5
TOP_P_MIN = 1e-6
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's seed is a 64-bit integer
MAX_STOPS, MAX_STOP_CHARS = 4, 256
MAX_JSON_DEPTH = 32

#: The request limits in words, for ``peftkit serve --help`` and the README.
REQUEST_LIMITS = (
    f"temperature 0-2 (below {GREEDY_BELOW:g}: greedy, as 0), top_p {TOP_P_MIN:g}-1, seed an integer "
    f"in [-2^63, 2^63-1], max_tokens at least 1, stop a string or up to {MAX_STOPS} strings of "
    f"1-{MAX_STOP_CHARS} characters, a non-empty prompt, a body of valid UTF-8 JSON nested at most "
    f"{MAX_JSON_DEPTH} deep"
)

#: A prompt's size in bytes is bounded before it is tokenized: this many bytes per token of
#: ``max_prompt_tokens`` (far above what text needs: a token of ordinary text is about four bytes).
BYTES_PER_PROMPT_TOKEN = 16


@dataclass(frozen=True)
class ServeLimits:
    """Limits and the key.

    Attributes:
        api_key: the key clients send as ``Authorization: Bearer KEY``; None: no key needed.
        max_prompt_tokens: the longest prompt, in tokens, after the chat template.
        max_new_tokens: the largest ``max_tokens``; also chat's default.
        max_body_bytes: the largest request body.
        retry_after_seconds: the ``Retry-After`` of a 429/503 answer.
        read_timeout_seconds: a request's headers, and then its body, must arrive within this.
        keep_alive_seconds: an idle kept-alive connection is closed after this.
        max_connections: open connections at most; more are closed at once.
        shutdown_grace_seconds: on shutdown, running requests get this long to finish.
    """

    api_key: str | None = None
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 512
    max_body_bytes: int = 1 << 20
    retry_after_seconds: int = 1
    read_timeout_seconds: float = 10.0
    keep_alive_seconds: float = 5.0
    max_connections: int = 256
    shutdown_grace_seconds: float = 5.0

    @property
    def max_prompt_bytes(self) -> int:
        """The largest prompt in UTF-8 bytes (see :data:`BYTES_PER_PROMPT_TOKEN`)."""
        return BYTES_PER_PROMPT_TOKEN * self.max_prompt_tokens
