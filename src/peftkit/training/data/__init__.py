"""Training data on Hugging Face ``datasets``: local files → chats → tokenized, prompt-masked rows.

Files: ``.jsonl``/``.json``/``.csv``/``.parquet``, in one of three layouts (column names mappable):

- ``prompt_completion``: a prompt and its answer (``prompt_template`` can build the prompt from any
  columns, e.g. ``"Summarize:\\n{dialogue}"``);
- ``instruction``: ``instruction``, optional ``input``, ``output`` (the Alpaca layout);
- ``messages``: a list of ``{"role", "content"}`` chat turns.

Instead of a file, ``data`` may name a data set ``datasets.load_dataset`` finds (a Hub id or a
directory of data files) with an optional split: ``owner/name:train``.

Every row becomes a chat; the tokenizer's chat template renders it when it has one. Labels are -100
except on the assistant's turns, so the loss counts the completion only. Examples longer than
``max_length`` lose the middle of their prompt, or their end when the answer alone is too long
(counted; one left with no answer token is dropped). ``packing`` fills rows of up to ``max_length``
tokens with several whole examples, each attending only to itself (where it applies and pays; see
:func:`~peftkit.training.data.prepare.pack_training_rows`); ``padding_free`` keeps each batch's
examples and lays them end to end instead of padding them.

Modules, in the order the data goes through them:

- :mod:`~peftkit.training.data.tables`: data files and data sets → a table;
- :mod:`~peftkit.training.data.chats`: rows → chats (:class:`DataFormat`), chats → tokens (:func:`encode`);
- :mod:`~peftkit.training.data.tokenization`: tokenized, truncated rows; classification rows;
- :mod:`~peftkit.training.data.packing`: several examples per row (best-fit decreasing), or one
  (padding-free);
- :mod:`~peftkit.training.data.prepare`: all of it for a run's settings (:func:`prepare_data`), and
  whether to pack (:func:`pack_training_rows`);
- :mod:`~peftkit.training.data.batching`: rows → padded tensors (:func:`collate`) or one packed
  sequence (:func:`collate_packed`).
"""

from peftkit.training.data.batching import collate, collate_packed, position_ids
from peftkit.training.data.chats import DataFormat, encode, to_chats
from peftkit.training.data.prepare import (
    PreparedData,
    check_data,
    data_files,
    pack_training_rows,
    packing_blocker,
    prepare_data,
    with_labels,
)
from peftkit.training.data.tables import load_table

__all__ = [
    "DataFormat",
    "PreparedData",
    "check_data",
    "collate",
    "collate_packed",
    "data_files",
    "encode",
    "load_table",
    "pack_training_rows",
    "packing_blocker",
    "position_ids",
    "prepare_data",
    "to_chats",
    "with_labels",
]
