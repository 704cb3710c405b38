"""The bytes of one way of training (:class:`MemoryBreakdown`): full fine-tuning or LoRA (QLoRA), from
the activations, the weights, their gradients and the optimizer's states; the peak combines them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from peftkit.core.targeting import find_targets
from peftkit.memory.activations import Saved, saved_activations
from peftkit.memory.architecture import Architecture
from peftkit.memory.setting import FROZEN, FULL, QUANTIZED_BITS, Setting, Use
from peftkit.methods.lora import LoraConfig
from peftkit.ops.linear_cross_entropy import CHUNK_ELEMENTS

QUANT_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256
ADAMW_8BIT_BLOCK = 2048  # bitsandbytes' block-wise quantisation: one float32 scale per block and state


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted memory of one way of training, in bytes.

    Attributes:
        label: e.g. ``"full fine-tuning"`` or ``"lora r=8 (all-linear)"``.
        trainable_parameters: parameters that get a gradient.
        weights, gradients, optimizer_states, activations: see the module docstring.
        temporaries: the short-lived tensors around the peak moment.
        peak: the predicted peak (not the sum: gradients and activations are not all alive at once).
    """

    label: str
    trainable_parameters: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    temporaries: int
    peak: int

    @property
    def weights_multiple(self) -> float:
        """The peak as a multiple of the weights (full fine-tuning with AdamW: roughly 5–20×)."""
        return self.peak / self.weights


def full_breakdown(model: nn.Module, arch: Architecture, setting: Setting, total: int) -> MemoryBreakdown:
    """Full fine-tuning of the meta-device ``model`` (``total`` parameters): every weight trains."""
    activations = saved_activations(arch, setting, lambda name: FULL, norms_train=True, embedding_trains=True)
    e = setting.weight_bytes
    largest = max(p.numel() for p in model.parameters())
    head_params = _head_parameters(model, arch)
    return _peak_breakdown(
        "full fine-tuning",
        trainable=total,
        weights=total * e,
        trainable_bytes=e,
        activations=activations,
        arch=arch,
        setting=setting,
        largest_trainable=largest,
        head_gradient=head_params * e,
    )


def lora_breakdown(
    model: nn.Module, arch: Architecture, setting: Setting, total: int, config: LoraConfig
) -> MemoryBreakdown:
    """LoRA as ``config`` describes it on the meta-device ``model`` (QLoRA with ``setting.quantize``)."""
    config = config.with_default_targets(model)
    targets = find_targets(model, config)
    uses = {name: Use("lora", config.rank_for(name), config.lora_dropout) for name in targets}
    adapters = [config.build_adapter(name, model.get_submodule(name)) for name in targets]
    sizes = [sum(p.numel() for p in adapter.parameters()) for adapter in adapters]
    trainable = sum(sizes)
    embedding_trains = arch.embedding in uses
    activations = saved_activations(
        arch,
        setting,
        lambda name: uses.get(name, FROZEN),
        norms_train=False,
        embedding_trains=embedding_trains,
    )
    shown = (
        config.target_modules if isinstance(config.target_modules, str) else ", ".join(config.target_modules)
    )
    label = f"lora r={config.r} ({shown})" + (
        f", dropout {config.lora_dropout}" if config.lora_dropout else ""
    )
    a = setting.adapter_bytes
    weights = total * setting.weight_bytes + trainable * a
    scratch = 0
    if setting.quantize is not None:
        linears = _quantized_linears(model, arch)
        stored = sum(_linear_numel(m) for m in linears)
        weights += sum(_quantized_bytes(m, setting) for m in linears) - stored * setting.weight_bytes
        # backward through a quantized layer dequantizes its weight (compute dtype), one layer at a time
        scratch = max((_linear_numel(m) for m in linears), default=0) * setting.weight_bytes
        label = label.replace("lora ", f"qlora {setting.quantize} ", 1)
    return _peak_breakdown(
        label,
        trainable=trainable,
        weights=weights,
        trainable_bytes=a,
        activations=activations,
        arch=arch,
        setting=setting,
        largest_trainable=max(sizes),
        head_gradient=0,
        backward_scratch=scratch,
    )


def _peak_breakdown(
    label: str,
    trainable: int,
    weights: int,
    trainable_bytes: int,
    activations: Saved,
    arch: Architecture,
    setting: Setting,
    largest_trainable: int,
    head_gradient: int,
    backward_scratch: int = 0,
) -> MemoryBreakdown:
    """Gradients and optimizer states of ``trainable`` parameters, the loss's temporaries, and the
    peak: the largest of the moments at the loss, recomputing a checkpointed layer, and the step."""
    gradients = trainable * trainable_bytes
    if setting.optimizer == "adamw":
        optimizer_states = 2 * trainable * trainable_bytes
        optimizer_scratch = 2 * largest_trainable * trainable_bytes
    elif setting.optimizer == "adamw8bit":
        optimizer_states = 2 * trainable + 2 * 4 * math.ceil(trainable / ADAMW_8BIT_BLOCK)
        optimizer_scratch = 2 * largest_trainable * trainable_bytes
    else:
        optimizer_states = optimizer_scratch = 0
    if setting.loss == "fused":
        # one chunk's float32 logits and their exp at a time; in backward the scaled ∂/∂hidden
        loss_temporaries = max(2 * CHUNK_ELEMENTS * 4, setting.tokens * arch.hidden * 4)
    else:
        logits = setting.tokens * arch.vocab
        # Around the loss's backward: two float32 logits-sized tensors (the float32 logits, or their
        # float32 copy, and their gradient; measured the same for float32 and 4-bit bases);
        # an 8-bit base holds about one more (measured 3.2-3.3 on SmolLM2; which tensor is not known).
        # At the output head's backward the head's weight gradient joins the logits and one gradient.
        copies = 3 if setting.quantize == "int8" else 2
        loss_temporaries = max(logits * 4 * copies, logits * (setting.weight_bytes + 4) + head_gradient)
    loss_temporaries += backward_scratch
    at_loss = activations.at_loss + loss_temporaries
    # With checkpointing a layer's activations come back in backward, when (at worst) all gradients exist.
    recomputing = activations.recomputed + gradients if activations.recomputed else 0
    after_backward = gradients + optimizer_scratch
    temporaries = loss_temporaries if at_loss >= max(recomputing, after_backward) else optimizer_scratch
    peak = weights + optimizer_states + max(at_loss, recomputing, after_backward)
    return MemoryBreakdown(
        label=label,
        trainable_parameters=trainable,
        weights=weights,
        gradients=gradients,
        optimizer_states=optimizer_states,
        activations=activations.at_loss + activations.recomputed,
        temporaries=temporaries,
        peak=peak,
    )


def _head_parameters(model: nn.Module, arch: Architecture) -> int:
    if arch.lm_head is None:
        return 0
    return sum(p.numel() for p in model.get_submodule(arch.lm_head).parameters())


def _quantized_linears(model: nn.Module, arch: Architecture) -> list[nn.Module]:
    """The linear layers bitsandbytes quantizes: every ``nn.Linear`` but the output head."""
    return [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != arch.lm_head
    ]


def _linear_numel(module: nn.Module) -> int:
    return module.in_features * module.out_features


def _quantized_bytes(module: nn.Module, setting: Setting) -> int:
    """Bytes of one quantized linear layer's weight (values, block scales), its bias at full size."""
    n = _linear_numel(module)
    bits = QUANTIZED_BITS[setting.quantize] * n
    if setting.quantize == "int8":
        bits += 32 * module.out_features
    elif setting.double_quant:
        bits += 8 * math.ceil(n / QUANT_BLOCK) + 32 * math.ceil(n / (QUANT_BLOCK * DOUBLE_QUANT_BLOCK))
    else:
        bits += 32 * math.ceil(n / QUANT_BLOCK)
    return math.ceil(bits / 8)
