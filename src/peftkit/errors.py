"""The one exception type for bad user input (a config value, a data file, a model path)."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Input the user can fix: the message names what was wrong and how to fix it.

    The ``peftkit`` command prints it as one line on stderr and exits with code 2.
    """
