"""Adapter arithmetic: combine, weight, negate and compress trained LoRA adapters on their weight updates.

- :mod:`~peftkit.arithmetic.settings`: the combination types and :class:`Combination` (the settings,
  checked); no torch, so the command line reads them before a model loads;
- :mod:`~peftkit.arithmetic.maths`: the combinations on ΔW (task arithmetic, TIES, DARE, magnitude
  pruning) and the best low-rank fit with its error; pure functions on tensors;
- :mod:`~peftkit.arithmetic.weighted`: the walk over a wrapped model's LoRA layers that builds the new
  adapter (``PeftModel.add_weighted_adapter`` calls it).

Only the settings are imported here; the other two load torch.
"""

from peftkit.arithmetic.settings import COMBINATION_TYPES, Combination

__all__ = ["COMBINATION_TYPES", "Combination"]
