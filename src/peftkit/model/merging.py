"""Folding adapters into the base weights and back, and unwrapping (``merge_and_unload``, ``unload``);
a mixin of :class:`~peftkit.model.PeftModel`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from peftkit.core.layer import AdapterLayer, ModulesToSave
from peftkit.core.whole_model import ModelAdapter
from peftkit.foundation.errors import UsageError
from peftkit.foundation.quantization import SCHEMES, dequantized_linear, is_quantized
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


class Merging:
    """PeftModel's merge methods (its state: ``model``, ``model_adapters``, the wrappers)."""

    @property
    def merged_adapters(self) -> list[str]:
        """Adapters currently folded into the base weights, in merge order."""
        merged: list[str] = []
        for _, wrapper in self._wrappers():
            if isinstance(wrapper, AdapterLayer):
                merged += [name for name in wrapper.merged_adapters if name not in merged]
        return merged + [name for name, adapter in self.model_adapters.items() if adapter.merged]

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights in place; reversible.

        Weights are merged in float32 whatever their dtype. With ``safe_merge`` each layer's result
        is checked before it is written; on a non-finite one the layers merged so far are unmerged
        again (their weights restored up to float rounding) and nothing stays merged.

        Raises:
            ValueError: an unknown name, or ``safe_merge`` found NaN/inf.
            NotImplementedError: a method that cannot be merged (soft prompts); nothing is merged then.
        """
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        self._check_known(names)
        quantized = [
            name
            for name, w in self._wrappers()
            if isinstance(w, AdapterLayer) and is_quantized(w.base) and set(names) & set(w.adapters)
        ]
        if quantized:
            raise ValueError(
                f"cannot merge into the 4-bit/8-bit weights of {quantized[0]} in place (re-quantizing "
                "would change them); merge_and_unload() returns a dequantized model with the adapter merged"
            )
        model_level = [self.model_adapters[name] for name in names if name in self.model_adapters]
        layers = [w for _, w in self._wrappers() if isinstance(w, AdapterLayer)]
        merged_before = [len(layer.merged_adapters) for layer in layers]
        merged_model_level: list[ModelAdapter] = []
        try:
            for adapter in model_level:  # first: a method that cannot merge refuses before anything changes
                if not adapter.merged:
                    adapter.merge(self.model)
                    merged_model_level.append(adapter)
            for layer in layers:
                layer.merge(names, safe=safe_merge)
        except Exception:
            for layer, count in zip(layers, merged_before, strict=True):
                layer.unmerge(keep=count)
            for adapter in merged_model_level:
                adapter.unmerge(self.model)
            raise

    def unmerge_adapter(self) -> None:
        """Take every merged adapter back out of the base weights."""
        for _, wrapper in self._wrappers():
            if isinstance(wrapper, AdapterLayer):
                wrapper.unmerge()
        for adapter in self.model_adapters.values():
            adapter.unmerge(self.model)

    def merge_and_unload(
        self,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
        requantize: bool | str = False,
        probe: Tensor | None = None,
    ) -> nn.Module:
        """Merge adapters (default: the active ones) and return the plain base model, no peftkit inside.

        ``modules_to_save`` copies of the merged adapters replace their originals. This PeftModel is
        empty afterwards. A quantized base (4-bit or 8-bit) comes back dequantized, every linear layer
        a plain ``nn.Linear`` in its compute dtype, with the adapters merged exactly.

        Args:
            requantize: quantize the merged layers again instead (``True``: each layer as it was;
                ``"nf4"``, ``"fp4"``, ``"int8"``: that scheme). This changes the merged weights: the
                change of the logits against the unmerged model is measured on ``probe`` and kept
                as the returned model's ``requantization_report``
                (a :class:`peftkit.model.requantization.RequantizationReport`, which also gives the change
                the adapter itself makes, for scale).
            probe: ``(batch, seq)`` token ids for that measurement (default: 2×64 ids drawn with a
                fixed seed from the vocabulary).

        Raises:
            UsageError: ``requantize`` on a base that is not quantized, or an unknown scheme.
        """
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        self.unmerge_adapter()
        self._check_known(names)
        if requantize:
            return self._merge_requantized(names, safe_merge, requantize, probe)
        self._dequantize()
        self.merge_adapter(names, safe_merge=safe_merge)
        return self._unwrap(keep_copies_of=names)

    def _merge_requantized(
        self, names: list[str], safe_merge: bool, scheme: bool | str, probe: Tensor | None
    ) -> nn.Module:
        # Keyed by their paths once unwrapped: a wrapper's quantized base will sit where the wrapper is.
        layers = {self._unwrapped_path(n): settings for n, settings in quantized_layers(self.model).items()}
        if not layers:
            raise UsageError(
                "requantize: the base model is not quantized; merge without it and load the merged "
                "model quantized (peftkit.foundation.loading.load_model(..., quantize='nf4'))"
            )
        if isinstance(scheme, str):
            if scheme not in SCHEMES:
                raise UsageError(f"requantize: unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
            layers = {name: settings.with_scheme(scheme) for name, settings in layers.items()}
        probe = default_probe(self.model) if probe is None else probe
        with self._active_only(names):
            reference = model_logits(self, probe)
        with self.disable_adapters():
            base = model_logits(self, probe)
        record = self._dequantize(torch.float32)  # merged and quantized again without rounding between
        self.merge_adapter(names, safe_merge=safe_merge)
        merged = self._unwrap(keep_copies_of=names)
        requantize_layers(merged, layers)
        first = next(iter(layers.values()))
        scheme_record(record, first.scheme, first.compute_dtype).attach(merged)
        merged.requantization_report = RequantizationReport(
            drift=logit_drift(reference, model_logits(merged, probe)),
            adapter_effect=logit_drift(base, reference),
        )
        return merged

    def _unwrapped_path(self, name: str) -> str:
        """The path the module at ``name`` will have after unwrapping (a wrapper's ``base`` moves up)."""
        parent, _, child = name.rpartition(".")
        if child == "base" and isinstance(self.model.get_submodule(parent), AdapterLayer):
            return parent
        return name

    @contextmanager
    def _active_only(self, names: list[str]) -> Iterator[None]:
        """Make ``names`` the active adapters for the block (the reference a merge of them must match)."""
        before = list(self._active)
        if names != before:
            self.set_adapter(names)
        try:
            yield
        finally:
            if names != before and before:
                self.set_adapter(before)

    def unload(self) -> nn.Module:
        """Remove every adapter (unmerging first) and return the original base model."""
        self.unmerge_adapter()
        return self._unwrap(keep_copies_of=[])

    def _dequantize(self, dtype: torch.dtype | None = None) -> QuantizationRecord:
        """Turn every bitsandbytes layer of the base model into a plain ``nn.Linear`` (for merging) in
        ``dtype`` (default: its compute dtype); returns transformers' record that the model was
        quantized, now removed from it."""
        quantized = [(name, m) for name, m in self.model.named_modules() if is_quantized(m)]
        for name, module in quantized:
            self.model.set_submodule(name, dequantized_linear(module, dtype))
        return detach_quantization_record(self.model) if quantized else QuantizationRecord()

    def _unwrap(self, keep_copies_of: list[str]) -> nn.Module:
        for name, adapter in self.model_adapters.items():
            adapter.release(self.model, keep_values=name in keep_copies_of and adapter.merged)
        self.model_adapters = nn.ModuleDict()
        for name, wrapper in list(self._wrappers()):
            if isinstance(wrapper, ModulesToSave):
                kept = [n for n in keep_copies_of if n in wrapper.copies]
                self.model.set_submodule(name, wrapper.copies[kept[0]] if kept else wrapper.original)
            else:
                self.model.set_submodule(name, wrapper.base)
        self.peft_config.clear()
        self._targets.clear()
        self._trainable.clear()
        self._active = []
        return self.model
