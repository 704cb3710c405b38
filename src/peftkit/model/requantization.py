"""Re-quantizing a merged model (an explicit choice) and measuring what it changed.

``merge_and_unload()`` on a 4-bit or 8-bit base gives a dequantized model with the adapter merged
exactly. Users who want the merged model small again ask for ``requantize``: every layer that was
quantized is quantized again, from the merged weights, and the change of the logits against the
unmerged model is measured on a probe batch (:class:`LogitDrift`) rather than hidden behind a warning.

The pieces here are independent of peftkit's wrapper: reading a layer's quantization settings,
building a bitsandbytes layer from a plain ``nn.Linear``, detaching and re-attaching transformers'
record that a model is quantized (so ``save_pretrained`` writes a checkpoint ``from_pretrained``
loads back quantized), and the drift statistics (a pure function).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any

from peftkit.foundation.errors import UsageError
from peftkit.foundation.quantization import SCHEMES, is_quantized, quantization_config

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = [
    "LayerQuantization",
    "LogitDrift",
    "QuantizationRecord",
    "RequantizationReport",
    "default_probe",
    "detach_quantization_record",
    "logit_drift",
    "model_logits",
    "quantized_layers",
    "requantize_layers",
    "scheme_record",
]

_FLAGS = ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized")


@dataclasses.dataclass(frozen=True)
class LayerQuantization:
    """How one bitsandbytes layer stores its weight: what it takes to build it again.

    ``scheme`` is ``"nf4"``, ``"fp4"`` or ``"int8"``; the 4-bit fields follow ``Params4bit``'s names,
    ``threshold`` is LLM.int8()'s outlier threshold.
    """

    scheme: str
    compute_dtype: Any = None
    blocksize: int = 64
    compress_statistics: bool = True
    quant_storage: Any = None
    threshold: float = 0.0

    @classmethod
    def of(cls, module: nn.Module) -> LayerQuantization:
        """The settings of the bitsandbytes layer ``module``."""
        weight = module.weight
        if type(weight).__name__ == "Int8Params":
            return cls("int8", threshold=float(getattr(module.state, "threshold", 0.0)))
        return cls(
            weight.quant_type,
            compute_dtype=getattr(module, "compute_dtype", None),
            blocksize=weight.blocksize,
            compress_statistics=weight.compress_statistics,
            quant_storage=weight.quant_storage,
        )

    def with_scheme(self, scheme: str) -> LayerQuantization:
        """These settings for another scheme, keeping the compute dtype (defaults for the rest)."""
        if scheme == self.scheme:
            return self
        if scheme == "int8":
            return LayerQuantization("int8", threshold=6.0)  # transformers' llm_int8_threshold default
        return LayerQuantization(scheme, compute_dtype=self.compute_dtype)


@dataclasses.dataclass(frozen=True)
class QuantizationRecord:
    """What transformers keeps on a model to know it is quantized (``config.quantization_config``,
    ``hf_quantizer``, ``quantization_method`` and flags); ``None`` fields were absent."""

    config: Any = None
    quantizer: Any = None
    method: Any = None
    flags: tuple[tuple[str, Any], ...] = ()

    def attach(self, model: nn.Module) -> None:
        """Put the record back on ``model`` (the quantizer's ``postprocess_model`` does the same)."""
        if self.config is None:
            return
        if hasattr(model, "config"):
            model.config.quantization_config = self.config
            model.config._is_quantized = True
        for name, value in (("hf_quantizer", self.quantizer), ("quantization_method", self.method)):
            if value is not None:
                setattr(model, name, value)
        for name, value in self.flags:
            with contextlib.suppress(AttributeError):  # a read-only property follows hf_quantizer
                setattr(model, name, value)


def detach_quantization_record(model: nn.Module) -> QuantizationRecord:
    """Remove transformers' record that ``model`` is quantized and return it.

    A model whose layers were dequantized must not keep it: transformers would save and treat the
    model as quantized.
    """
    config = getattr(model, "config", None)
    record = QuantizationRecord(
        config=getattr(config, "quantization_config", None),
        quantizer=getattr(model, "hf_quantizer", None),
        method=getattr(model, "quantization_method", None),
        flags=tuple((f, getattr(model, f)) for f in _FLAGS if isinstance(getattr(model, f, None), bool)),
    )
    if record.config is not None:
        del config.quantization_config
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False
    for name in ("hf_quantizer", "quantization_method"):
        if hasattr(model, name):
            setattr(model, name, None)
    for name, _ in record.flags:
        with contextlib.suppress(AttributeError):
            setattr(model, name, False)
    return record


def scheme_record(record: QuantizationRecord, scheme: str, compute_dtype: Any) -> QuantizationRecord:
    """``record`` for a model re-quantized with ``scheme`` (a new ``BitsAndBytesConfig`` and quantizer
    when the scheme changed)."""
    if record.config is not None and _scheme_of_config(record.config) == scheme:
        return record
    from transformers.quantizers import AutoHfQuantizer

    if scheme == "int8":
        config = quantization_config("int8")
    else:
        config = quantization_config(scheme, compute_dtype=compute_dtype or "float32")
    kind = "8bit" if scheme == "int8" else "4bit"
    flags = tuple((name, name in ("is_quantized", f"is_loaded_in_{kind}")) for name, _ in record.flags)
    return QuantizationRecord(
        config=config,
        quantizer=AutoHfQuantizer.from_config(config, pre_quantized=True),
        method=config.quant_method,
        flags=flags,
    )


def _scheme_of_config(config: Any) -> str | None:
    if getattr(config, "load_in_8bit", False):
        return "int8"
    if getattr(config, "load_in_4bit", False):
        return getattr(config, "bnb_4bit_quant_type", "fp4")
    return None


def quantized_layers(model: nn.Module) -> dict[str, LayerQuantization]:
    """Each bitsandbytes layer of ``model`` by module path, with its settings."""
    return {name: LayerQuantization.of(m) for name, m in model.named_modules() if is_quantized(m)}


def requantize_layers(model: nn.Module, layers: dict[str, LayerQuantization]) -> None:
    """Replace each ``nn.Linear`` named in ``layers`` by a bitsandbytes layer quantized from its weight.

    Raises:
        UsageError: a scheme peftkit does not know.
    """
    for name, settings in layers.items():
        if settings.scheme not in SCHEMES:
            raise UsageError(f"unknown quantization {settings.scheme!r}; use one of {', '.join(SCHEMES)}")
        model.set_submodule(name, _quantized_linear(model.get_submodule(name), settings))


def _quantized_linear(linear: nn.Linear, settings: LayerQuantization) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight quantized with ``settings``, on its device."""
    import bitsandbytes as bnb
    import torch

    weight = linear.weight.detach()
    has_bias = linear.bias is not None
    if settings.scheme == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
            threshold=settings.threshold, device="meta",
        )  # fmt: skip
        layer.weight = bnb.nn.Int8Params(weight.float().cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=settings.compute_dtype,
            compress_statistics=settings.compress_statistics, quant_type=settings.scheme,
            quant_storage=settings.quant_storage or torch.uint8, device="meta",
        )  # fmt: skip
        layer.weight = bnb.nn.Params4bit(
            weight.cpu(), requires_grad=False,
            blocksize=settings.blocksize, compress_statistics=settings.compress_statistics,
            quant_type=settings.scheme, quant_storage=settings.quant_storage or torch.uint8, module=layer,
        )  # fmt: skip
    if has_bias:
        layer.bias = torch.nn.Parameter(linear.bias.detach().cpu().clone(), requires_grad=False)
    layer = layer.to(weight.device)  # bitsandbytes quantizes on the move to a real device
    layer.train(linear.training)
    return layer


@dataclasses.dataclass(frozen=True)
class LogitDrift:
    """How far the logits of a re-quantized model are from the unmerged model's, on a probe batch.

    ``max_abs`` and ``mean_abs`` are over every logit; ``relative`` is ``mean_abs`` over the mean
    absolute reference logit; ``top1_agreement`` is the share of positions whose most likely next
    token is unchanged; ``positions`` counts them.
    """

    max_abs: float
    mean_abs: float
    relative: float
    top1_agreement: float
    positions: int

    def __str__(self) -> str:
        return (
            f"logits changed by {self.mean_abs:.4g} on average ({self.relative:.2%} of their mean size), "
            f"{self.max_abs:.4g} at most; the most likely next token is the same at "
            f"{self.top1_agreement:.1%} of {self.positions} positions"
        )


@dataclasses.dataclass(frozen=True)
class RequantizationReport:
    """What re-quantizing a merged model did, measured on a probe batch.

    ``drift``: the re-quantized model against the unmerged one (quantized base plus adapter), the
    change re-quantizing made. ``adapter_effect``: the unmerged model against its base alone, the
    change the adapter itself makes; a drift of its size means the adapter's effect is largely lost
    (the update was smaller than the quantization steps it was rounded to).
    """

    drift: LogitDrift
    adapter_effect: LogitDrift

    def __str__(self) -> str:
        if not self.adapter_effect.mean_abs:
            return f"against the unmerged model, {self.drift}. The adapter itself changes no logit"
        ratio = self.drift.mean_abs / self.adapter_effect.mean_abs
        return (
            f"against the unmerged model, {self.drift}. For scale, the adapter itself changes the base "
            f"model's logits by {self.adapter_effect.mean_abs:.4g} on average: the drift is {ratio:.2f}x that"
        )


def logit_drift(reference: Tensor, logits: Tensor) -> LogitDrift:
    """Compare ``logits`` with ``reference``, both ``(batch, seq, vocab)`` (or ``(rows, vocab)``)."""
    reference, logits = reference.float(), logits.float()
    if reference.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference.shape)} vs {tuple(logits.shape)}")
    difference = (logits - reference).abs()
    mean_abs = difference.mean().item()
    scale = reference.abs().mean().item()
    agree = (logits.argmax(-1) == reference.argmax(-1)).float()
    return LogitDrift(
        max_abs=difference.max().item(),
        mean_abs=mean_abs,
        relative=mean_abs / scale if scale > 0 else 0.0,
        top1_agreement=agree.mean().item(),
        positions=agree.numel(),
    )


def default_probe(model: nn.Module, rows: int = 2, length: int = 64) -> Tensor:
    """Token ids to measure drift on when the caller gives none: ``(rows, length)`` ids drawn with a
    fixed seed from the model's vocabulary.

    Raises:
        UsageError: the model has no ``config.vocab_size`` (pass a probe).
    """
    import torch

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        raise UsageError("the model has no config.vocab_size to draw probe tokens from; pass probe=token ids")
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (rows, length), generator=generator)


def model_logits(model: nn.Module, probe: Tensor) -> Tensor:
    """``model``'s logits for the token ids ``probe`` ``(batch, seq)`` (the decoder reads them too in an
    encoder-decoder model), without gradients.

    4-bit layers compute with bitsandbytes' standard CPU kernel here, as they do under a ``PeftModel``
    (which switches off the repacked bfloat16 kernel, see ``keep_trainable_layout``): a comparison of
    a wrapped and a plain model then measures the weights, not the kernels (the repacked one computes
    with bfloat16 block scales). The layers keep their setting afterwards.
    """
    import torch

    device = next(model.parameters()).device
    probe = probe.to(device)
    kwargs = {"input_ids": probe}
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = probe
    was_training = model.training
    repacking = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    model.eval()
    for module in repacking:
        module.support_avx512bf16_for_cpu = False
    try:
        with torch.no_grad():
            output = model(**kwargs)
    finally:
        model.train(was_training)
        for module in repacking:
            module.support_avx512bf16_for_cpu = True
    return output.logits if hasattr(output, "logits") else output[0]
