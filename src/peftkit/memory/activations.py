"""What autograd saves for one forward of a decoder (:func:`saved_activations`), layer by layer; the model is
in :mod:`peftkit.memory.estimate`'s docstring."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peftkit.memory.architecture import Architecture
from peftkit.memory.setting import FROZEN, Setting, Use
from peftkit.ops.dropout import recorded_bytes


@dataclass(frozen=True)
class Saved:
    """Activation bytes alive at the loss, and those of the largest layer recomputed in backward."""

    at_loss: int
    recomputed: int


def saved_activations(
    arch: Architecture,
    setting: Setting,
    use_of: Any,
    norms_train: bool,
    embedding_trains: bool,
) -> Saved:
    """Bytes autograd saves for one forward (see the module docstring for the model)."""
    T, e = setting.tokens, setting.weight_bytes
    layer_bytes = []
    grad = embedding_trains  # does a gradient flow into the current hidden state?
    for index in range(arch.num_layers):
        prefix = f"{arch.layers_path}.{index}."
        layer, grad = _layer_activations(arch, setting, lambda n, p=prefix: use_of(p + n), grad, norms_train)
        layer_bytes.append(layer)
    head = _norm(arch, T, e, grad, norms_train)
    head_use = use_of(arch.lm_head) if arch.lm_head else FROZEN
    if setting.loss == "fused":  # the gradients are computed in the forward and kept, float32
        head += T * arch.hidden * 4 if grad else 0
        head += arch.vocab * arch.hidden * 4 if head_use.kind == "full" else 0
    else:
        head += _group_input(T * arch.hidden, [head_use], setting, grad)
        if grad or head_use.kind != "frozen":
            head += T * arch.vocab * 4  # float32 log-softmax of the loss
    if embedding_trains:
        head += T * 8  # the token ids, int64
    if setting.grad_checkpointing:  # each layer keeps its input; one layer at a time is recomputed
        return Saved(at_loss=arch.num_layers * T * arch.hidden * e + head, recomputed=max(layer_bytes))
    return Saved(at_loss=sum(layer_bytes) + head, recomputed=0)


def _layer_activations(
    arch: Architecture, setting: Setting, use_of: Any, grad: bool, norms_train: bool
) -> tuple[int, bool]:
    T, e = setting.tokens, setting.weight_bytes
    saved = _norm(arch, T, e, grad, norms_train)
    attn_in = [use_of(name) for name in arch.attn_in]
    saved += _group_input(T * arch.hidden, attn_in, setting, grad)
    attention_grad = grad or _trains(attn_in)
    q_size, kv_size = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    if attention_grad:  # q, k, v, output, and a float32 log-sum-exp per head and token
        saved += T * (2 * q_size + 2 * kv_size) * e + T * arch.heads * 4
        if setting.padded:  # measured (CPU SDPA): two float32 (batch, seq, seq) tensors per layer
            seq = T // setting.batch
            saved += 2 * setting.batch * seq * seq * 4
    attn_out = use_of(arch.attn_out)
    saved += _group_input(T * q_size, [attn_out], setting, attention_grad, already_saved=attention_grad)
    grad = attention_grad or _trains([attn_out])
    saved += _norm(arch, T, e, grad, norms_train)
    mlp_in = [use_of(name) for name in arch.mlp_in]
    saved += _group_input(T * arch.hidden, mlp_in, setting, grad)
    if arch.gated:  # act(gate) saves the gate output; act(gate) * up saves each factor the other needs
        gate = grad or _trains([use_of(n) for n in arch.mlp_in if "gate" in n] or mlp_in)
        up = grad or _trains([use_of(n) for n in arch.mlp_in if "gate" not in n] or mlp_in)
        saved += (2 * gate + up) * T * arch.intermediate * e
        mlp_grad = gate or up
    else:  # the activation saves the first projection's output
        mlp_grad = grad or _trains(mlp_in)
        saved += mlp_grad * T * arch.intermediate * e
    mlp_out = use_of(arch.mlp_out)
    saved += _group_input(T * arch.intermediate, [mlp_out], setting, mlp_grad)
    return saved, mlp_grad or _trains([mlp_out])


def _norm(arch: Architecture, T: int, e: int, grad: bool, weight_trains: bool) -> int:
    if not grad:
        return 0
    if arch.rms_norm:  # float32 input (a copy for half dtypes), rstd, normalised input for the weight
        return T * arch.hidden * 4 + T * 4 + (T * arch.hidden * e if weight_trains else 0)
    return T * arch.hidden * e + 2 * T * 4  # LayerNorm: input, mean, rstd


def _trains(uses: Sequence[Use]) -> bool:
    return any(use.kind != "frozen" for use in uses)


def _group_input(
    elements: int, uses: Sequence[Use], setting: Setting, grad: bool, already_saved: bool = False
) -> int:
    """Bytes saved for one tensor read by a group of linear layers (e.g. q, k and v); ``grad``: whether
    a gradient flows into that tensor."""
    e, a = setting.weight_bytes, setting.adapter_bytes
    lora = [use for use in uses if use.kind == "lora"]
    saves_input = any(use.kind == "full" for use in uses) or any(
        setting.fast_lora or (use.dropout == 0 and a == e) for use in lora
    )
    saved = elements * e if saves_input and not already_saved else 0
    for use in lora:
        saved += setting.tokens * use.r * a  # the rank-r activation A·x
        if setting.fast_lora:
            saved += recorded_bytes(elements, use.dropout)  # the dropped elements' positions or mask
        elif use.dropout > 0:  # the dropped copy, and dropout's float noise where x needs a gradient
            saved += (1 + grad) * elements * a
        elif a != e:
            saved += elements * a  # the float32 copy of a half-precision input
    return saved
