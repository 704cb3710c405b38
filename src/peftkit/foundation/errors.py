"""The one exception type for bad user input (a config value, a data file, a model path), and the
"did you mean" hint every unknown name gets."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

__all__ = ["UsageError", "closest"]


class UsageError(ValueError):
    """Input the user can fix: the message names what was wrong and how to fix it.

    The ``peftkit`` command prints it as one line on stderr and exits with code 2.
    """


def closest(word: str, candidates: Iterable[str], aliases: Mapping[str, str] | None = None) -> str:
    """`` (did you mean 'x'?)`` for the nearest candidate, or ``""`` when none is near.

    ``aliases`` maps names from other tools to ours (``learning_rate`` → ``lr``); one that names a
    candidate wins over spelling.
    """
    candidates = list(candidates)
    alias = (aliases or {}).get(word)
    match = [alias] if alias in candidates else difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""
