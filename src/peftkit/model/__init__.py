"""PeftModel, and ``wrap`` / ``load`` to make one.

- :mod:`.peft_model`: the class: adding, switching, deleting, combining and counting adapters;
- :mod:`.files`: reading and writing adapter files (Hugging Face PEFT's layout);
- :mod:`.merging`: merging into the base weights and back, ``merge_and_unload``, ``unload``;
- :mod:`.running`: ``forward``, ``generate``, activation checkpointing;
- :mod:`.routing`: mixed batches (one adapter per row), the function the wrappers call for them;
- :mod:`.entry`: ``wrap`` and ``load``.
"""

from peftkit.model.entry import load, wrap
from peftkit.model.files import DEFAULT_ADAPTER_NAME
from peftkit.model.peft_model import PeftModel, count_parameters

__all__ = ["DEFAULT_ADAPTER_NAME", "PeftModel", "count_parameters", "load", "wrap"]
