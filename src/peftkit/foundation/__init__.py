"""What everything else stands on; imports nothing of peftkit above it:

- :mod:`~peftkit.foundation.errors`: ``UsageError`` and ``closest`` ("did you mean");
- :mod:`~peftkit.foundation.io`: atomic writes, adapter files (safetensors), the overwrite guard;
- :mod:`~peftkit.foundation.formatting`: counts, sizes, durations, plain-text tables;
- :mod:`~peftkit.foundation.modules`: facts about module types shared by every floor (``is_conv1d``);
- :mod:`~peftkit.foundation.cpu_load`: the cores other programs keep busy, so the CPU threads to take;
- :mod:`~peftkit.foundation.tasks`: the one task table (CLI name, Hugging Face ``task_type``, auto class);
- :mod:`~peftkit.foundation.loading`: base models and tokenizers (hub id, directory, GGUF, the bundled
  SmolLM2); documented as :mod:`peftkit.models`;
- :mod:`~peftkit.foundation.quantization`: bitsandbytes configs, finding and dequantizing layers.

Nothing is imported here.
"""
