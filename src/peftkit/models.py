"""Base models and their tokenizers, at the import path the README documents.

``from peftkit.models import load_model``: a Hugging Face id or local directory, a ``.gguf`` file, or with
no argument the bundled SmolLM2-135M-Instruct. The code lives in :mod:`peftkit.foundation.loading`.
"""

from peftkit.foundation.loading import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_HUB_ID,
    TASKS,
    cache_dir,
    default_model_dir,
    load_model,
    load_tokenizer,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_HUB_ID",
    "TASKS",
    "cache_dir",
    "default_model_dir",
    "load_model",
    "load_tokenizer",
]
