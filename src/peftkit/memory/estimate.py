"""The memory of a training step predicted from a model's config alone: :func:`estimate`.

The model behind :func:`estimate`
---------------------------------
The model is built from its config on the ``meta`` device (no weights are read or allocated; a 70B
config takes about a second). With ``e`` the bytes of the weight dtype, ``a`` those of the trainable
parameters (float32 adapters on a half-precision base, as peftkit makes them), ``T = batch × seq``:

- **weights**: every parameter (a tied embedding once) × ``e``, plus the adapters × ``a``.
- **gradients**: one per trainable parameter, in its dtype.
- **optimizer states**: AdamW 2 per trainable parameter in its dtype (what ``torch.optim.AdamW``
  allocates); 8-bit AdamW 2 bytes (+ one float32 scale per 2048 values); SGD without momentum none.
- **activations**: what autograd saves for the backward (``saved_tensors_hooks`` sees exactly these),
  walked layer by layer for a Llama-style decoder (Llama, Mistral, Qwen2, SmolLM2; GPT-2-style blocks
  approximately), counting a tensor once however many operations save it. Per decoder layer, when
  gradients flow through it:

  - each norm: its input (float32), ``rstd`` (T floats), and its normalised input when the norm's weight
    trains (``e``); LayerNorm: input, mean and rstd;
  - the input of a group of linear layers (q/k/v share one; gate/up share one): saved once when one of
    them trains its weight or has a LoRA adapter reading it unchanged; autograd's LoRA dropout adds its
    float noise and the dropped copy per adapted layer, peftkit's fast path the dropped elements'
    positions instead (8 bytes per drop; a ``bool`` mask for p > 1/8);
    each adapter also saves its ``(T, r)`` rank-r activation;
  - attention (``scaled_dot_product_attention``, no padding mask): rotated q, k, v (k and v with the
    key/value heads), the output (which is also the output projection's input) and a float32
    log-sum-exp per head and token;
  - gated MLP: the gate and up outputs and the activation's output (3 × ``T × intermediate``), plus the
    down projection's input when it trains; plain MLP: the first projection's output.

  Then the final norm, the output head's input (when it trains), and the float32 log-softmax of the
  loss (``T × vocab``). Layers before the first trainable one save nothing: no gradient flows there.
  With gradient checkpointing each layer keeps only its input, plus one layer recomputed at a time.
- **temporaries**: what lives only around the peak: the logits (held by the model output) and two
  float32 ``T × vocab`` gradients of the loss, or, after the backward, the optimizer's per-parameter
  scratch (twice the largest parameter for AdamW).

**peak** = weights + optimizer states + the largest of: activations + loss temporaries (the start of
the backward); with checkpointing, the kept layer inputs + one recomputed layer + all gradients; and
gradients + optimizer scratch (the step). The gradients of a full fine-tuning step arrive while the
activations are freed, so the two are never all alive at once. "× weights" is the peak over the
weights.

With ``padded`` (rows of different lengths, an explicit attention mask) each layer's attention also
keeps two float32 ``batch × seq × seq`` tensors (measured with PyTorch's CPU attention; 0.53 GiB at
4 × 768 on SmolLM2). With ``loss="fused"`` (``peftkit train``'s loss) there are no logits: the loss
keeps float32 gradients for the head's input (``T × hidden``; the head's weight too when it trains)
and one chunk of logits at a time.

Not modelled: key/value caches, mixture-of-experts layers, encoder-decoder models,
``modules_to_save``, and memory the runtime keeps besides tensors (CUDA context, allocator caching,
kernel scratch; on the CPU, the process's code and libraries).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from peftkit.core.targeting import find_targets
from peftkit.foundation.modules import is_conv1d
from peftkit.methods.lora import LoraConfig
from peftkit.ops import fast_lora_enabled
from peftkit.ops.dropout import recorded_bytes
from peftkit.ops.linear_cross_entropy import CHUNK_ELEMENTS

__all__ = [
    "DTYPES",
    "GIB",
    "OPTIMIZERS",
    "MemoryBreakdown",
    "MemoryEstimate",
    "estimate",
    "load_model_config",
]

GIB = 1024**3
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
OPTIMIZERS = ("adamw", "sgd", "adamw8bit")
LOSSES = ("model", "fused")
# bits per weight of bitsandbytes' layouts: 4-bit values, plus one absmax per block of 64 weights (a
# float32, or with double quantization an 8-bit code and a float32 per 256 blocks); int8: a float32
# scale per output row on top (added per layer).
QUANTIZED_BITS = {"nf4": 4.0, "fp4": 4.0, "int8": 8.0}
QUANT_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256
ADAMW_8BIT_BLOCK = 2048  # bitsandbytes' block-wise quantisation: one float32 scale per block and state

_OUTPUT_PROJECTIONS = {
    "o_proj",
    "out_proj",
    "dense",
    "c_proj",
    "wo",
    "down_proj",
    "fc2",
    "w2",
    "dense_4h_to_h",
}
_ATTENTION_PARENTS = ("attn", "attention")
_MLP_PARENTS = ("mlp", "feed_forward", "ffn")


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


@dataclass(frozen=True)
class MemoryEstimate:
    """Full fine-tuning and a PEFT method side by side, for one batch shape and dtype.

    Attributes:
        model: the model's name or type.
        total_parameters: parameters of the base model.
        batch, seq, dtype, optimizer, grad_checkpointing: the setting estimated.
        device_memory: bytes available on the device, or None.
        full: full fine-tuning.
        peft: the PEFT method.
    """

    model: str
    total_parameters: int
    batch: int
    seq: int
    dtype: str
    optimizer: str
    grad_checkpointing: bool
    device_memory: int | None
    full: MemoryBreakdown
    peft: MemoryBreakdown

    def fits(self, breakdown: MemoryBreakdown) -> bool | None:
        """Whether the predicted peak fits in ``device_memory`` (None when no memory was given)."""
        return None if self.device_memory is None else breakdown.peak <= self.device_memory

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, sizes in bytes."""
        return asdict(self)


def estimate(
    model_or_config: Any,
    method: str | LoraConfig = "lora",
    r: int = 8,
    targets: str | Sequence[str] | None = "all-linear",
    batch: int = 1,
    seq: int = 512,
    dtype: str | torch.dtype = "float32",
    optimizer: str = "adamw",
    grad_checkpointing: bool = False,
    device_memory: float | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    fast_lora: bool | None = None,
    loss: str = "model",
    padded: bool = False,
    quantize: str | None = None,
    double_quant: bool = True,
) -> MemoryEstimate:
    """Predict the peak memory of a training step, full fine-tuning next to LoRA.

    Args:
        model_or_config: a transformers ``PretrainedConfig``, a transformers model (only its config is
            read), a local directory or Hub id with a ``config.json``, or ``"smollm2-135m-instruct"``.
        method: ``"lora"``, or a :class:`~peftkit.LoraConfig` (then ``r``, ``targets``, ``lora_alpha``
            and ``lora_dropout`` are taken from it).
        r: LoRA rank.
        targets: LoRA ``target_modules`` (``"all-linear"``, names such as ``["q_proj", "v_proj"]``, or
            None: the model's attention projections, ``peftkit train``'s default).
        batch, seq: rows per step and tokens per row.
        dtype: the weights' dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        optimizer: ``"adamw"``, ``"sgd"`` (no momentum) or ``"adamw8bit"``.
        grad_checkpointing: keep only each decoder layer's input and recompute the rest in backward.
        device_memory: GiB available on the device, for "fits / does not fit".
        lora_alpha: LoRA alpha (does not change memory); defaults to ``r``.
        lora_dropout: dropout on the LoRA path: costs memory unless the fast path is on.
        fast_lora: whether peftkit's fast LoRA path is used; defaults to the current setting.
        loss: ``"model"``, the model's own loss (logits, then cross-entropy), or ``"fused"``, the output
            head fused with the cross-entropy as ``peftkit train`` computes it
            (:func:`peftkit.ops.linear_cross_entropy`: no logits, the head's gradients kept instead).
        padded: the batch's rows have different lengths, so an explicit attention mask is passed
            (``peftkit train`` pads each batch to its longest row).
        quantize: ``"nf4"``, ``"fp4"`` or ``"int8"``: the PEFT column's base has its linear layers
            (not the output head) quantized with bitsandbytes (QLoRA); the full fine-tuning column
            stays at ``dtype``.
        double_quant: 4-bit block scales quantized too (bitsandbytes' ``bnb_4bit_use_double_quant``).

    Raises:
        ValueError: an unknown method, dtype or optimizer; a config without the decoder fields
            (``hidden_size``, ``num_hidden_layers``…); a decoder layer whose linear layers are not
            recognised.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} must be one of {list(OPTIMIZERS)}")
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} must be one of {list(LOSSES)}")
    if quantize not in (None, *QUANTIZED_BITS):
        raise ValueError(f"quantize={quantize!r} must be None or one of {list(QUANTIZED_BITS)}")
    torch_dtype = _parse_dtype(dtype)
    lora_config = _lora_config(method, r, targets, lora_alpha, lora_dropout)
    config = load_model_config(model_or_config)
    model = _meta_model(config)
    arch = _analyse(model, config)
    setting = _Setting(
        tokens=batch * seq,
        weight_bytes=torch.tensor([], dtype=torch_dtype).element_size(),
        optimizer=optimizer,
        grad_checkpointing=grad_checkpointing,
        fast_lora=fast_lora_enabled() if fast_lora is None else fast_lora,
        loss=loss,
        batch=batch,
        padded=padded,
        quantize=quantize,
        double_quant=double_quant,
    )
    total = sum(p.numel() for p in model.parameters())
    # full fine-tuning trains the weights themselves: never on a quantized base
    full = _full_breakdown(model, arch, replace(setting, quantize=None), total)
    peft = _lora_breakdown(model, arch, setting, total, lora_config)
    return MemoryEstimate(
        model=model_or_config if isinstance(model_or_config, str) else _config_name(config),
        total_parameters=total,
        batch=batch,
        seq=seq,
        dtype=str(torch_dtype).removeprefix("torch."),
        optimizer=optimizer,
        grad_checkpointing=grad_checkpointing,
        device_memory=None if device_memory is None else int(device_memory * GIB),
        full=full,
        peft=peft,
    )


@dataclass(frozen=True)
class _Setting:
    tokens: int
    weight_bytes: int
    optimizer: str
    grad_checkpointing: bool
    fast_lora: bool
    loss: str = "model"
    batch: int = 1
    padded: bool = False
    quantize: str | None = None
    double_quant: bool = True

    @property
    def adapter_bytes(self) -> int:
        return max(self.weight_bytes, 4)  # half-precision bases get float32 adapters


@dataclass(frozen=True)
class _Use:
    """How a linear layer takes part in training: ``"full"`` weight, ``"lora"`` adapter or ``"frozen"``."""

    kind: str
    r: int = 0
    dropout: float = 0.0


FROZEN = _Use("frozen")
FULL = _Use("full")


@dataclass(frozen=True)
class _Arch:
    """A decoder's shape, read from its config and its first decoder layer."""

    layers_path: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated: bool
    rms_norm: bool
    attn_in: tuple[str, ...]
    attn_out: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    embedding: str
    lm_head: str | None


def _full_breakdown(model: nn.Module, arch: _Arch, setting: _Setting, total: int) -> MemoryBreakdown:
    activations = _activations(arch, setting, lambda name: FULL, norms_train=True, embedding_trains=True)
    e = setting.weight_bytes
    largest = max(p.numel() for p in model.parameters())
    head_params = _head_parameters(model, arch)
    return _breakdown(
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


def _lora_breakdown(
    model: nn.Module, arch: _Arch, setting: _Setting, total: int, config: LoraConfig
) -> MemoryBreakdown:
    config = config.with_default_targets(model)
    targets = find_targets(model, config)
    uses = {name: _Use("lora", config.rank_for(name), config.lora_dropout) for name in targets}
    adapters = [config.build_adapter(name, model.get_submodule(name)) for name in targets]
    sizes = [sum(p.numel() for p in adapter.parameters()) for adapter in adapters]
    trainable = sum(sizes)
    embedding_trains = arch.embedding in uses
    activations = _activations(
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
    return _breakdown(
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


def _breakdown(
    label: str,
    trainable: int,
    weights: int,
    trainable_bytes: int,
    activations: _Saved,
    arch: _Arch,
    setting: _Setting,
    largest_trainable: int,
    head_gradient: int,
    backward_scratch: int = 0,
) -> MemoryBreakdown:
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


@dataclass(frozen=True)
class _Saved:
    """Activation bytes alive at the loss, and those of the largest layer recomputed in backward."""

    at_loss: int
    recomputed: int


def _activations(
    arch: _Arch,
    setting: _Setting,
    use_of: Any,
    norms_train: bool,
    embedding_trains: bool,
) -> _Saved:
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
        return _Saved(at_loss=arch.num_layers * T * arch.hidden * e + head, recomputed=max(layer_bytes))
    return _Saved(at_loss=sum(layer_bytes) + head, recomputed=0)


def _layer_activations(
    arch: _Arch, setting: _Setting, use_of: Any, grad: bool, norms_train: bool
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


def _norm(arch: _Arch, T: int, e: int, grad: bool, weight_trains: bool) -> int:
    if not grad:
        return 0
    if arch.rms_norm:  # float32 input (a copy for half dtypes), rstd, normalised input for the weight
        return T * arch.hidden * 4 + T * 4 + (T * arch.hidden * e if weight_trains else 0)
    return T * arch.hidden * e + 2 * T * 4  # LayerNorm: input, mean, rstd


def _trains(uses: Sequence[_Use]) -> bool:
    return any(use.kind != "frozen" for use in uses)


def _group_input(
    elements: int, uses: Sequence[_Use], setting: _Setting, grad: bool, already_saved: bool = False
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


def _head_parameters(model: nn.Module, arch: _Arch) -> int:
    if arch.lm_head is None:
        return 0
    return sum(p.numel() for p in model.get_submodule(arch.lm_head).parameters())


# ------------------------------------------------------------------------------------------- model
def _quantized_linears(model: nn.Module, arch: _Arch) -> list[nn.Module]:
    """The linear layers bitsandbytes quantizes: every ``nn.Linear`` but the output head."""
    return [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != arch.lm_head
    ]


def _linear_numel(module: nn.Module) -> int:
    return module.in_features * module.out_features


def _quantized_bytes(module: nn.Module, setting: _Setting) -> int:
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


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPES)}")


def _lora_config(
    method: str | LoraConfig, r: int, targets: str | Sequence[str] | None, alpha: float | None, dropout: float
) -> LoraConfig:
    if isinstance(method, LoraConfig):
        if method.use_dora:
            raise ValueError("use_dora=True: estimate models plain LoRA, not DoRA's magnitude and norms")
        if method.modules_to_save:
            raise ValueError(
                f"modules_to_save={list(method.modules_to_save)}: estimate does not model full copies of "
                "modules; leave it unset"
            )
        return method
    if method != "lora":
        raise ValueError(f"method={method!r}: estimate models 'lora' (or pass a LoraConfig)")
    target_modules = targets if targets is None or isinstance(targets, str) else list(targets)
    return LoraConfig(
        r=r, lora_alpha=alpha if alpha is not None else r, lora_dropout=dropout, target_modules=target_modules
    )


def load_model_config(model_or_config: Any) -> Any:
    """The transformers config of a config, model, local directory, Hub id or the bundled default.

    Raises:
        ValueError: no config can be found (the message says what to pass).
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config
    if isinstance(model_or_config, nn.Module):
        config = getattr(model_or_config, "config", None)
        if not isinstance(config, PretrainedConfig):
            raise ValueError(
                f"{type(model_or_config).__name__} has no transformers config; pass the model's "
                "PretrainedConfig, a directory with config.json, or a Hub id"
            )
        return config
    if isinstance(model_or_config, str):
        from peftkit.foundation.loading import DEFAULT_MODEL, default_model_dir

        source = str(default_model_dir()) if model_or_config == DEFAULT_MODEL else model_or_config
        try:
            return AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as error:
            reason = " ".join(str(error).split())  # transformers' messages span lines; errors here are one
            raise ValueError(
                f"no config.json for {model_or_config!r}: give a local model directory, a cached Hub id, "
                f"or {DEFAULT_MODEL!r} ({reason})"
            ) from error
    raise ValueError(
        f"cannot estimate {type(model_or_config).__name__}; pass a config, model, path or Hub id"
    )


def _config_name(config: Any) -> str:
    return str(getattr(config, "_name_or_path", "") or config.model_type)


def _meta_model(config: Any) -> nn.Module:
    """The model built on the meta device: shapes only, no memory, no initialisation cost."""
    from transformers import AutoModelForCausalLM

    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{config.model_type} is an encoder-decoder model; estimate models decoder-only LMs")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return name, module
    raise ValueError(f"found no list of {num_layers} decoder layers in {type(model).__name__}")


def _linear_features(module: nn.Module) -> tuple[int, int]:
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def _analyse(model: nn.Module, config: Any) -> _Arch:
    missing = [
        f
        for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if not hasattr(config, f)
    ]
    if missing:
        raise ValueError(
            f"the {config.model_type} config lacks {missing}; estimate needs a decoder LM config"
        )
    layers_path, layers = _decoder_layers(model, config.num_hidden_layers)
    groups: dict[str, list[str]] = {"attn_in": [], "attn_out": [], "mlp_in": [], "mlp_out": []}
    features: dict[str, tuple[int, int]] = {}
    for name, module in layers[0].named_modules():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            continue
        parent, _, leaf = name.rpartition(".")
        part = "attn" if any(p in parent for p in _ATTENTION_PARENTS) else None
        part = part or ("mlp" if any(p in parent for p in _MLP_PARENTS) else None)
        if part is None:
            raise ValueError(f"{config.model_type}: cannot tell whether {name!r} is attention or MLP")
        groups[f"{part}_{'out' if leaf in _OUTPUT_PROJECTIONS else 'in'}"].append(name)
        features[name] = _linear_features(module)
    if (
        len(groups["attn_out"]) != 1
        or len(groups["mlp_out"]) != 1
        or not groups["attn_in"]
        or not groups["mlp_in"]
    ):
        raise ValueError(
            f"{config.model_type}: expected attention input projections, one output projection, MLP input "
            f"projections and one down projection per layer; found {groups}"
        )
    intermediate = features[groups["mlp_out"][0]][0]
    first_in = groups["mlp_in"][0]
    gated = len(groups["mlp_in"]) >= 2 or features[first_in][1] == 2 * intermediate
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    names = {id(module): name for name, module in model.named_modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return _Arch(
        layers_path=layers_path,
        num_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=intermediate,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        gated=gated,
        rms_norm=any("RMSNorm" in type(m).__name__ for m in layers[0].modules()),
        attn_in=tuple(groups["attn_in"]),
        attn_out=groups["attn_out"][0],
        mlp_in=tuple(groups["mlp_in"]),
        mlp_out=groups["mlp_out"][0],
        embedding=names[id(model.get_input_embeddings())],
        lm_head=names.get(id(head)) if head is not None else None,
    )
