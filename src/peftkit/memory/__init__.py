"""Memory of a training step: predicted from a model's config (:func:`estimate`) and measured
(:func:`measure_training_step`), full fine-tuning next to PEFT.

- :mod:`~peftkit.memory.estimate`: the analytic estimate on a meta-device model (its docstring is the
  model), built from :mod:`~peftkit.memory.setting` (the step's settings), :mod:`~peftkit.memory.architecture`
  (the decoder's shape), :mod:`~peftkit.memory.activations` (what autograd saves) and
  :mod:`~peftkit.memory.breakdown` (weights, gradients, optimizer states, the peak);
- :mod:`~peftkit.memory.measure`: a real step, activations by saved-tensor hooks, the CPU peak tracked;
- :mod:`~peftkit.memory.planner`: the batch shapes that fit a memory budget;
- :mod:`~peftkit.memory.table`: the side-by-side table ``peftkit estimate`` prints.
"""

from peftkit.memory.architecture import load_model_config
from peftkit.memory.breakdown import MemoryBreakdown
from peftkit.memory.estimate import GIB, MemoryEstimate, estimate
from peftkit.memory.measure import MeasuredMemory, measure_training_step
from peftkit.memory.setting import DTYPES, OPTIMIZERS
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
