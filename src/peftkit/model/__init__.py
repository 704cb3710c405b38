"""PeftModel, and ``wrap`` / ``load`` to make one.

- :mod:`.peft_model`: the class, a facade over its :class:`~.adapter_set.AdapterSet` (the public API);
- :mod:`.adapter_set`: the adapters of one model and their state: adding, removing, activating,
  merging, disabling, unwrapping; :mod:`.injection` builds one adapter before the model changes;
- :mod:`.files`: reading and writing adapter files (Hugging Face PEFT's layout);
- :mod:`.merging`: ``merge_and_unload`` (dequantized, or re-quantized with :mod:`.requantization`);
- :mod:`.combining`: ``add_weighted_adapter``;
- :mod:`.running`: ``forward``, ``generate``, activation checkpointing;
- :mod:`.routing`: mixed batches (one adapter per row), the function the wrappers call for them;
- :mod:`.signature`: the subclass per base-model class whose ``forward`` shows the base's parameters;
- :mod:`.entry`: ``wrap`` and ``load``.
"""

from peftkit.model.entry import load, wrap
from peftkit.model.files import DEFAULT_ADAPTER_NAME
from peftkit.model.peft_model import PeftModel, count_parameters

__all__ = ["DEFAULT_ADAPTER_NAME", "PeftModel", "count_parameters", "load", "wrap"]
