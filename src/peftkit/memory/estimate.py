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

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from peftkit.memory.architecture import analyse, config_name, load_model_config, meta_model
from peftkit.memory.breakdown import MemoryBreakdown, full_breakdown, lora_breakdown
from peftkit.memory.setting import Setting, check_choices, parse_dtype
from peftkit.methods.lora import LoraConfig
from peftkit.ops import fast_lora_enabled

__all__ = ["GIB", "MemoryEstimate", "estimate"]

GIB = 1024**3


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
    setting, torch_dtype = _setting(
        batch, seq, dtype, optimizer, grad_checkpointing, fast_lora, loss, padded, quantize, double_quant
    )
    lora_config = _lora_config(method, r, targets, lora_alpha, lora_dropout)
    return _estimate(model_or_config, lora_config, setting, torch_dtype, seq, device_memory)


def _setting(
    batch: int,
    seq: int,
    dtype: str | torch.dtype,
    optimizer: str,
    grad_checkpointing: bool,
    fast_lora: bool | None,
    loss: str,
    padded: bool,
    quantize: str | None,
    double_quant: bool,
) -> tuple[Setting, torch.dtype]:
    """The checked :class:`Setting` of ``estimate``'s arguments, and the weights' dtype."""
    check_choices(optimizer, loss, quantize)
    torch_dtype = parse_dtype(dtype)
    return Setting(
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
    ), torch_dtype


def _estimate(
    model_or_config: Any,
    lora_config: LoraConfig,
    setting: Setting,
    dtype: torch.dtype,
    seq: int,
    device_memory: float | None,
) -> MemoryEstimate:
    """Full fine-tuning and LoRA estimated on the meta-device model of ``model_or_config``."""
    config = load_model_config(model_or_config)
    model = meta_model(config)
    arch = analyse(model, config)
    total = sum(p.numel() for p in model.parameters())
    return MemoryEstimate(
        model=model_or_config if isinstance(model_or_config, str) else config_name(config),
        total_parameters=total,
        batch=setting.batch,
        seq=seq,
        dtype=str(dtype).removeprefix("torch."),
        optimizer=setting.optimizer,
        grad_checkpointing=setting.grad_checkpointing,
        device_memory=None if device_memory is None else int(device_memory * GIB),
        # full fine-tuning trains the weights themselves: never on a quantized base
        full=full_breakdown(model, arch, replace(setting, quantize=None), total),
        peft=lora_breakdown(model, arch, setting, total, lora_config),
    )


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
