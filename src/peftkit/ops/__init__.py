"""Fast paths, each with a plain-PyTorch reference twin that the tests compare it to.

The fast LoRA path is on by default; turn it off for a block with ``with peftkit.ops.fast_lora(False):``,
for the whole process with ``peftkit.ops.set_fast_lora(False)``, or before start-up with the
environment variable ``PEFTKIT_FAST_LORA=0``. The fused output-head cross-entropy of the training loss
likewise: ``with peftkit.ops.fused_cross_entropy(False):`` or ``PEFTKIT_FUSED_CE=0``; the same switch
covers the fused per-token log-probabilities of the preference objectives (``linear_log_probs``).
"""

from peftkit.ops.dropout import draw_dropout
from peftkit.ops.linear_cross_entropy import (
    fused_cross_entropy,
    fused_cross_entropy_enabled,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    plain_output_head,
)
from peftkit.ops.linear_log_probs import linear_log_probs, linear_log_probs_reference
from peftkit.ops.lora_linear import (
    fast_lora,
    fast_lora_enabled,
    frozen_linear_lora,
    lora_linear,
    lora_linear_reference,
    set_fast_lora,
)

__all__ = [
    "draw_dropout",
    "fast_lora",
    "fast_lora_enabled",
    "frozen_linear_lora",
    "fused_cross_entropy",
    "fused_cross_entropy_enabled",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "linear_log_probs",
    "linear_log_probs_reference",
    "lora_linear",
    "lora_linear_reference",
    "plain_output_head",
    "set_fast_lora",
]
