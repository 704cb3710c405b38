"""Adapter arithmetic: combine, weight, negate and compress trained LoRA adapters on their weight updates.

- :mod:`~peftkit.arithmetic.maths`: the combinations on ΔW (task arithmetic, TIES, DARE, magnitude
  pruning) and the best low-rank fit with its error; pure functions on tensors;
- :mod:`~peftkit.arithmetic.weighted`: the walk over a wrapped model's LoRA layers that builds the new
  adapter (``PeftModel.add_weighted_adapter`` calls it).
"""

from peftkit.arithmetic.maths import COMBINATION_TYPES
from peftkit.arithmetic.weighted import CombinationReport, check_combination, combine_lora_adapters

__all__ = ["COMBINATION_TYPES", "CombinationReport", "check_combination", "combine_lora_adapters"]
