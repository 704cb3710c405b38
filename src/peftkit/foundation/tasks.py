"""The one task table: what ``--task`` names, the ``task_type`` adapter files record, the model class.

``TASKS`` maps ``peftkit train --task`` names to :class:`Task`; ``TASK_TYPES`` lists every ``task_type``
Hugging Face PEFT knows (an adapter file may carry any of them, peftkit trains the three in ``TASKS``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IGNORE_INDEX", "TASKS", "TASK_TYPES", "Task"]

IGNORE_INDEX = -100  # the label of a token no loss counts (PyTorch's and transformers' convention)


@dataclass(frozen=True)
class Task:
    """One task peftkit trains.

    Attributes:
        name: the ``--task`` value.
        task_type: Hugging Face PEFT's name for it (``adapter_config.json``'s ``task_type``).
        auto_class: the transformers ``Auto`` class that builds a model for it.
    """

    name: str
    task_type: str
    auto_class: str


TASKS = {
    task.name: task
    for task in (
        Task("causal-lm", "CAUSAL_LM", "AutoModelForCausalLM"),
        Task("seq2seq-lm", "SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM"),
        Task("seq-cls", "SEQ_CLS", "AutoModelForSequenceClassification"),
    )
}

TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
