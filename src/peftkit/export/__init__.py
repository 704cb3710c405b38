"""Out of peftkit, into the tools people run models with:

- :mod:`~peftkit.export.gguf_export`: ``export(source, out, format=...)``, GGUF for llama.cpp and Ollama
  (``peftkit export``), built from: :mod:`~peftkit.export.architectures` (the supported families, their
  hyper-parameters and tensor changes), :mod:`~peftkit.export.vocabulary` (the tokenizer),
  :mod:`~peftkit.export.merged` / :mod:`~peftkit.export.lora` (the tensors of a model / of a LoRA
  adapter), :mod:`~peftkit.export.gguf_file` (streaming them into a file),
  :mod:`~peftkit.export.chat_format` / :mod:`~peftkit.export.modelfile` (the Ollama Modelfile),
  :mod:`~peftkit.export.sources` (opening a run) and :mod:`~peftkit.export.verify` (llama.cpp's check).
- :mod:`~peftkit.export.vllm`: would vLLM serve this adapter directory (its checks, from the files alone).

Nothing heavy is imported here (``peftkit --help`` reads the two tuples below).
"""

FORMATS = ("gguf", "gguf-lora", "ollama")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
