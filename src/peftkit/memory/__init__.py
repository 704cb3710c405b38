"""Memory of a training step: predicted from a model's config (:func:`estimate`) and measured
(:func:`measure_training_step`), full fine-tuning next to PEFT.

- :mod:`~peftkit.memory.estimate`: the analytic estimate on a meta-device model (its docstring is the model);
- :mod:`~peftkit.memory.measure`: a real step, activations by saved-tensor hooks, the CPU peak tracked;
- :mod:`~peftkit.memory.table`: the side-by-side table ``peftkit estimate`` prints.
"""

from peftkit.memory.estimate import (
    DTYPES,
    GIB,
    OPTIMIZERS,
    MemoryBreakdown,
    MemoryEstimate,
    estimate,
    load_model_config,
)
from peftkit.memory.measure import MeasuredMemory, measure_training_step
from peftkit.memory.table import format_estimate

__all__ = [
    "DTYPES",
    "GIB",
    "OPTIMIZERS",
    "MeasuredMemory",
    "MemoryBreakdown",
    "MemoryEstimate",
    "estimate",
    "format_estimate",
    "load_model_config",
    "measure_training_step",
]
