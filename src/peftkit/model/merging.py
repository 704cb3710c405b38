"""``merge_and_unload``: the adapters folded into the base weights and the wrappers taken out, for plain
and quantized bases (dequantized, or quantized again with the change measured)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from peftkit.core.layer import AdapterLayer
from peftkit.foundation.errors import UsageError
from peftkit.foundation.quantization import SCHEMES, dequantized_linear, is_quantized
from peftkit.model.adapter_set import AdapterSet
from peftkit.model.requantization import (
    QuantizationRecord,
    RequantizationReport,
    default_probe,
    detach_quantization_record,
    logit_drift,
    model_logits,
    quantized_layers,
    requantize_layers,
    scheme_record,
)


def merge_and_unload(
    peft_model: nn.Module,
    adapters: AdapterSet,
    names: list[str],
    safe_merge: bool,
    requantize: bool | str,
    probe: Tensor | None,
) -> nn.Module:
    """Merge ``names`` and return the plain base model (see ``PeftModel.merge_and_unload``);
    ``peft_model`` is the adapted model, run to measure the change re-quantizing makes."""
    adapters.unmerge()
    adapters.check_known(names)
    if requantize:
        return _merge_requantized(peft_model, adapters, names, safe_merge, requantize, probe)
    _dequantize(adapters.model)
    adapters.merge(names, safe=safe_merge)
    return adapters.unwrap(keep_copies_of=names)


def _merge_requantized(
    peft_model: nn.Module,
    adapters: AdapterSet,
    names: list[str],
    safe_merge: bool,
    scheme: bool | str,
    probe: Tensor | None,
) -> nn.Module:
    model = adapters.model
    # Keyed by their paths once unwrapped: a wrapper's quantized base will sit where the wrapper is.
    layers = {_unwrapped_path(model, n): settings for n, settings in quantized_layers(model).items()}
    if not layers:
        raise UsageError(
            "requantize: the base model is not quantized; merge without it and load the merged "
            "model quantized (peftkit.foundation.loading.load_model(..., quantize='nf4'))"
        )
    if isinstance(scheme, str):
        if scheme not in SCHEMES:
            raise UsageError(f"requantize: unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
        layers = {name: settings.with_scheme(scheme) for name, settings in layers.items()}
    probe = default_probe(model) if probe is None else probe
    with _active_only(adapters, names):
        reference = model_logits(peft_model, probe)
    with adapters.disabled():
        base = model_logits(peft_model, probe)
    record = _dequantize(model, torch.float32)  # merged and quantized again without rounding between
    adapters.merge(names, safe=safe_merge)
    merged = adapters.unwrap(keep_copies_of=names)
    requantize_layers(merged, layers)
    first = next(iter(layers.values()))
    scheme_record(record, first.scheme, first.compute_dtype).attach(merged)
    merged.requantization_report = RequantizationReport(
        drift=logit_drift(reference, model_logits(merged, probe)),
        adapter_effect=logit_drift(base, reference),
    )
    return merged


def _unwrapped_path(model: nn.Module, name: str) -> str:
    """The path the module at ``name`` will have after unwrapping (a wrapper's ``base`` moves up)."""
    parent, _, child = name.rpartition(".")
    if child == "base" and isinstance(model.get_submodule(parent), AdapterLayer):
        return parent
    return name


@contextmanager
def _active_only(adapters: AdapterSet, names: list[str]) -> Iterator[None]:
    """Make ``names`` the active adapters for the block (the reference a merge of them must match)."""
    before = list(adapters.active)
    if names != before:
        adapters.check_activatable(names)
        adapters.activate(names)
    try:
        yield
    finally:
        if names != before and before:
            adapters.check_activatable(before)
            adapters.activate(before)


def _dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> QuantizationRecord:
    """Turn every bitsandbytes layer of ``model`` into a plain ``nn.Linear`` (for merging) in ``dtype``
    (default: its compute dtype); returns transformers' record that the model was quantized, now
    removed from it."""
    quantized = [(name, m) for name, m in model.named_modules() if is_quantized(m)]
    for name, module in quantized:
        model.set_submodule(name, dequantized_linear(module, dtype))
    return detach_quantization_record(model) if quantized else QuantizationRecord()
