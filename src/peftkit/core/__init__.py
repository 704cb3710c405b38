"""The adapter contracts every method builds on, bottom to top:

- :mod:`~peftkit.core.adapter_config`: ``AdapterConfig`` (frozen dataclass, Hugging Face PEFT field
  names, JSON in and out);
- :mod:`~peftkit.core.layer`: the layer-adapter protocol and its wrapper (``AdapterLayer``: the original
  module as ``base`` plus named adapters), ``ModulesToSave``;
- :mod:`~peftkit.core.whole_model`: the whole-model adapter protocol (soft prompts, selective);
- :mod:`~peftkit.core.targeting`: the one target-selection function.

Nothing is imported here.
"""
