"""Out of peftkit, into the tools people run models with:

- :mod:`~peftkit.export.vllm`: would vLLM serve this adapter directory (its checks, from the files alone).

Nothing is imported here.
"""
