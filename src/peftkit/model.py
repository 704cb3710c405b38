"""PeftModel: a base model with named adapters injected; add, load, switch, merge, save, unload."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import itertools
import json
import math
import os
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.arithmetic import CombinationReport, combine_lora_adapters
from peftkit.config import AdapterConfig, config_from_dict, config_to_json
from peftkit.errors import UsageError
from peftkit.formatting import format_count, format_percent
from peftkit.io import KEY_PREFIX, read_adapter, resolve_adapter_dir, write_adapter
from peftkit.layers import BASE_ADAPTER_NAME, AdapterLayer, ModulesToSave, Routing, outer_modules
from peftkit.methods import config_classes
from peftkit.quantization import SCHEMES, dequantized_linear, is_quantized, keep_trainable_layout
from peftkit.requantization import (
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
from peftkit.targeting import CLASSIFIER_HEAD_NAMES, find_targets, name_matches
from peftkit.whole_model import ModelAdapter, is_model_level

DEFAULT_ADAPTER_NAME = "default"
# The live PeftModel of each base model (by id), so a second wrap or load of the same base is refused
# even when its adapters change no module (soft prompts, selective). Weak: a dropped wrapper leaves it.
_WRAPPERS: weakref.WeakValueDictionary[int, PeftModel] = weakref.WeakValueDictionary()


class PeftModel(nn.Module):
    """A base model whose targeted modules carry named adapters.

    The base model is changed in place: each targeted module is replaced by a wrapper that keeps the
    original as ``base``. Attributes the wrapper lacks (``config``, ``generation_config``…) are read
    from the base model, so a wrapped transformers model keeps working where one is expected.
    ``PeftModel(model)`` is an instance of a subclass made once per base-model class whose ``forward``
    shows the base's parameters plus ``adapter_names`` (what ``inspect.signature`` and
    ``transformers.Trainer`` read: the dataset columns it keeps, the label names); it behaves as this class.
    Model-level methods (soft prompts, selective) wrap nothing: their adapters live in
    ``model_adapters`` and act through the hooks of :class:`~peftkit.whole_model.ModelAdapter`; at most
    one of them is active at a time.

    Args:
        model: any ``nn.Module``; a transformers model also gets ``generate`` and its ``config``.
    """

    def __new__(cls, model: nn.Module, *args: Any, **kwargs: Any) -> PeftModel:
        if cls is PeftModel and isinstance(model, nn.Module):
            cls = _class_for(type(model))
        return super().__new__(cls)

    def __reduce__(self) -> tuple[Any, ...]:
        # The subclass is made at run time (no importable name): pickle and deepcopy rebuild it from the
        # base model's class, then restore nn.Module's state as usual.
        return (_new_peft_model, (type(self.model),), self.__getstate__())

    def __init__(self, model: nn.Module) -> None:
        _check_module(model)
        super().__init__()
        self.model = model
        keep_trainable_layout(model)  # bitsandbytes' CPU inference layout would break adapter gradients
        _WRAPPERS[id(model)] = self
        self.peft_config: dict[str, AdapterConfig] = {}
        self._targets: dict[str, list[str]] = {}
        self._trainable: set[str] = set()
        self._active: list[str] = []
        self.model_adapters = nn.ModuleDict()
        self._model_adapters_disabled = False

    @property
    def _hf_peft_config_loaded(self) -> bool:
        """transformers' flag for "adapters are attached": its Trainer refuses to fine-tune a quantized
        model without them (``validate_quantization_for_training``), and would otherwise read the
        base model's ``False`` through :meth:`__getattr__`."""
        return bool(self.peft_config)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules, incl. "model"
        except AttributeError:
            if name == "model":  # not yet set: nothing to forward to
                raise
            return getattr(self.model, name)

    # ----------------------------------------------------------------------------- adapters
    def add_adapter(
        self, adapter_name: str, config: AdapterConfig, trainable: bool = True, strict_targets: bool = True
    ) -> None:
        """Inject a new adapter named ``adapter_name`` as ``config`` describes.

        The first adapter added becomes active; later ones wait for :meth:`set_adapter`.
        ``strict_targets=False`` (used when loading files) warns about ``target_modules`` entries that
        match nothing instead of refusing them.

        Raises:
            ValueError: a bad or taken name, a config that targets nothing (the message lists the
                candidates), ``modules_to_save`` naming no module, or an initialisation that cannot
                run (``init_lora_weights="loftq"`` on an unquantized base).
        """
        self._check_new_name(adapter_name)
        config = self._with_task_head(config)
        model_adapter = None
        if is_model_level(config):
            active_model_level = self._active_model_adapters()
            for active in active_model_level:  # a new adapter is built against the plain base model
                active.deactivate(self.model)
            try:
                config = config.resolve(self.model)
                model_adapter = config.build_model_adapter(self.model).to(_device_of(self.model))
                model_adapter.train(self.model.training)
            finally:
                for active in active_model_level:
                    active.activate(self.model)
            targets: list[str] = []
        else:
            targets = find_targets(self.model, config, strict=strict_targets)
        adapters = {}
        for name in targets:
            module = self.model.get_submodule(name)
            base = module.base if isinstance(module, AdapterLayer) else module
            adapters[name] = config.build_adapter(name, base).train(base.training)
        saved = self._modules_to_save(config)
        if model_adapter is not None:
            self.model_adapters[adapter_name] = model_adapter
        for name, adapter in adapters.items():
            module = self.model.get_submodule(name)
            if not isinstance(module, AdapterLayer):
                module = AdapterLayer(module)
                self.model.set_submodule(name, module)
            module.adapters[adapter_name] = adapter
        for name in saved:
            module = self.model.get_submodule(name)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                self.model.set_submodule(name, module)
            module.copies[adapter_name] = copy.deepcopy(module.original)
        self.peft_config[adapter_name] = config
        self._targets[adapter_name] = targets
        if trainable:
            self._trainable.add(adapter_name)
        self._apply_state(self._active or [adapter_name])
        try:
            config.initialize(self.model, adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)  # leave the model as it was
            raise

    def load_adapter(
        self,
        path: str | os.PathLike[str],
        adapter_name: str = DEFAULT_ADAPTER_NAME,
        is_trainable: bool = False,
    ) -> None:
        """Load an adapter saved by peftkit or Hugging Face PEFT and add it as ``adapter_name``.

        Args:
            path: an adapter directory, or a Hugging Face Hub repo id.
            adapter_name: the name to give it here.
            is_trainable: leave its parameters trainable (to continue training); else frozen.

        Raises:
            FileNotFoundError: no adapter there, or only pickled weights (never loaded).
            ValueError: a tensor of the file is missing here, unexpected here, or of another shape;
                nothing is loaded then.
        """
        config_dict, tensors = read_adapter(resolve_adapter_dir(path))
        config = config_from_dict(config_dict, config_classes())
        if is_model_level(config):  # the saved form: e.g. P-tuning's encoder output as a plain embedding
            config = config.replace(inference_mode=True)
        self.add_adapter(adapter_name, config, trainable=is_trainable, strict_targets=False)
        try:
            self._load_tensors(adapter_name, tensors, source=str(path))
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def load_adapter_weights(
        self, path: str | os.PathLike[str], adapter_name: str = DEFAULT_ADAPTER_NAME
    ) -> None:
        """Replace the values of the existing adapter ``adapter_name`` by those saved in ``path``.

        For continuing a training run: the parameters are written in place, so an optimizer holding them
        stays valid; trainability and the active adapters do not change. ``peftkit.integrations.Trainer``
        resumes checkpoints this way.

        Raises:
            FileNotFoundError: no adapter at ``path``.
            ValueError: an unknown adapter name; a config that differs from this adapter's (the fields
                are named); a tensor missing, unexpected or of another shape; or an adapter saved as a
                computed table (P-tuning's encoder output, a projected prefix), which cannot restore
                the parameters that compute it. Nothing is changed then.
        """
        self._check_known([adapter_name])
        config_dict, tensors = read_adapter(resolve_adapter_dir(path))
        methods = config_classes()
        saved = config_from_dict(config_dict, methods)
        current = config_from_dict(json.loads(self._config_json(adapter_name)), methods)
        differing = [
            f"{name}: {getattr(saved, name, None)!r} in the file, {getattr(current, name)!r} here"
            for name in (f.name for f in dataclasses.fields(current))
            if name != "base_model_name_or_path" and getattr(saved, name, None) != getattr(current, name)
        ]
        if type(saved) is not type(current) or differing:
            what = "; ".join(differing) or f"{saved.peft_type} in the file, {current.peft_type} here"
            raise ValueError(
                f"adapter {str(path)!r} was saved with another config than adapter {adapter_name!r} "
                f"({what}); wrap the base model with the config it was trained with, or add it as a new "
                "adapter with load_adapter()"
            )
        held = {id(t) for t in itertools.chain(self.parameters(), self.buffers())}
        computed = [key for key, t in self.adapter_state_dict(adapter_name).items() if id(t) not in held]
        if computed:
            raise ValueError(
                f"adapter {adapter_name!r} is saved as a table its trainable modules compute ({computed[0]}: "
                "P-tuning's encoder output, a projected prefix), so a file cannot restore those modules; "
                "continue such a run with `peftkit train --resume`, whose checkpoints keep them"
            )
        self._load_tensors(adapter_name, tensors, source=str(path))

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make ``adapter_name`` (or several: their contributions add up) the active adapter(s).

        A selective adapter's values are swapped into the base parameters when it becomes active and
        the original values put back when it stops being active.

        Raises:
            ValueError: an unknown name, adapters are merged (unmerge first), more than one
                model-level adapter (soft prompt, selective) among the names, or two adapters that
                scale the same layer's input (IA³ feed-forward).
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_known(names)
        model_level = [name for name in names if name in self.model_adapters]
        if len(model_level) > 1:
            raise ValueError(
                f"adapters {model_level} are model-level (soft prompt / selective) and only one of them can "
                "be active at a time; activate one, possibly together with layer adapters such as LoRA"
            )
        if self.merged_adapters:
            raise ValueError(
                f"adapters {self.merged_adapters} are merged into the weights; call unmerge_adapter() "
                "before set_adapter()"
            )
        self._check_input_scalings(names)
        self._apply_state(names)

    def _check_input_scalings(self, names: list[str]) -> None:
        """Refuse two input-scaling adapters (IA³ on a feed-forward layer) active on one layer: applied
        unmerged their scalings would add up, where the maths (and merging) multiplies them."""
        for path, wrapper in self._wrappers():
            if not isinstance(wrapper, AdapterLayer):
                continue
            scaling = [
                n
                for n in names
                if n in wrapper.adapters and getattr(wrapper.adapters[n], "scales_input", False)
            ]
            if len(scaling) > 1:
                raise ValueError(
                    f"adapters {scaling} both scale the input of {path} (IA³ feed-forward) and cannot be "
                    f"active together unmerged; activate one at a time, or fold them into the weights "
                    f"with merge_adapter({scaling})"
                )

    @property
    def active_adapters(self) -> list[str]:
        """The names of the adapters in use, in the order they apply."""
        return list(self._active)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; a module left with no adapter gets its original back.

        Raises:
            ValueError: an unknown name, or the adapter is merged (unmerge first).
        """
        self._check_known([adapter_name])
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it")
        for name, wrapper in list(self._wrappers()):
            store = wrapper.adapters if isinstance(wrapper, AdapterLayer) else wrapper.copies
            if adapter_name in store:
                del store[adapter_name]
            if len(store) == 0:
                self.model.set_submodule(name, _original(wrapper))
        if adapter_name in self.model_adapters:
            self.model_adapters[adapter_name].release(self.model, keep_values=False)
            del self.model_adapters[adapter_name]
        del self.peft_config[adapter_name]
        del self._targets[adapter_name]
        self._trainable.discard(adapter_name)
        remaining = [name for name in self._active if name != adapter_name]
        self._apply_state(remaining or list(self.peft_config)[:1])

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        seed: int | None = None,
        overwrite: bool = False,
    ) -> CombinationReport:
        """Add ``adapter_name``, a LoRA adapter combining the LoRA ``adapters`` with ``weights``.

        Hugging Face PEFT's arguments, defined on each module's weight updates ΔWᵢ = sᵢ·BᵢAᵢ
        (:mod:`peftkit.arithmetic`):

        - ``linear``, ``cat``: exactly ``Σ wᵢ·ΔWᵢ`` (the factors concatenated; rank = the sum of ranks);
          negative weights subtract (``[1, -1]`` on one adapter gives the base model);
        - ``svd``: the best rank-``svd_rank`` approximation of ``Σ wᵢ·ΔWᵢ``;
        - ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (and their ``*_svd`` names, the
          same maths): the papers' combination of the weighted updates, then that best fit.

        ``svd_rank`` unset: the largest of the adapters' ranks at each module. A module that only some
        adapters target is a zero update for the others. The result is an ordinary LoRA adapter
        (scaling 1, per-module ranks as ``rank_pattern``), inactive until :meth:`set_adapter`.

        Args:
            svd_clamp: clip the fitted factors' entries at this quantile (Hugging Face PEFT's).
            density: the share of entries each update keeps (TIES, DARE, magnitude pruning), in (0, 1].
            majority_sign_method: TIES's sign election, ``"total"`` or ``"frequency"``.
            seed: DARE's random drop; the same seed gives the same adapter (None: torch's global RNG).
            overwrite: replace an existing adapter named ``adapter_name`` (not a merged one).

        Returns:
            The rank and the fit's relative error ‖T − ΔW‖/‖T‖ per module and in total (0 when exact).

        Raises:
            ValueError: a bad argument, an existing name without ``overwrite``, or an adapter that is not
                LoRA (DoRA, IA³, prompts, prefix, bottleneck …); nothing changes then.
        """
        replacing = adapter_name in self.peft_config
        if replacing and not overwrite:
            raise ValueError(
                f"an adapter named {adapter_name!r} exists already; pick another name or pass overwrite=True"
            )
        if replacing and adapter_name in self.merged_adapters:
            raise ValueError(
                f"adapter {adapter_name!r} is merged; call unmerge_adapter() before replacing it"
            )
        if not replacing:
            self._check_new_name(adapter_name)
        config, tensors, report = combine_lora_adapters(
            self.model,
            self.peft_config,
            adapters,
            weights,
            combination_type,
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            density=density,
            majority_sign_method=majority_sign_method,
            seed=seed,
        )
        active = self.active_adapters
        if replacing:
            self.delete_adapter(adapter_name)
        self.add_adapter(adapter_name, config)
        self._load_tensors(adapter_name, tensors, source=f"add_weighted_adapter({adapter_name!r})")
        self._apply_state(active)
        return report

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Inside this block the model computes exactly what the base model computes.

        Merged adapters are taken out for the block and merged back after it.
        """
        merged = self.merged_adapters
        self.unmerge_adapter()
        wrappers = [wrapper for _, wrapper in self._wrappers()]
        for wrapper in wrappers:
            wrapper.disabled = True
        model_level = self._active_model_adapters()
        for adapter in model_level:
            adapter.deactivate(self.model)
        self._model_adapters_disabled = True
        try:
            yield
        finally:
            for wrapper in wrappers:
                wrapper.disabled = False
            self._model_adapters_disabled = False
            for adapter in model_level:
                adapter.activate(self.model)
            if merged:
                self.merge_adapter(merged)

    # ----------------------------------------------------------------------------- merging
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
                (a :class:`peftkit.requantization.RequantizationReport`, which also gives the change
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
                "model quantized (peftkit.models.load_model(..., quantize='nf4'))"
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

    # ----------------------------------------------------------------------------- files
    def save_pretrained(
        self, save_directory: str | os.PathLike[str], selected_adapters: Sequence[str] | None = None
    ) -> None:
        """Write each adapter as Hugging Face PEFT does: ``adapter_config.json`` and
        ``adapter_model.safetensors`` in ``save_directory`` for ``"default"``, in
        ``save_directory/<name>/`` for any other name. Each file is written atomically.
        """
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        self._check_known(names)
        for name in names:
            directory = Path(save_directory)
            if name != DEFAULT_ADAPTER_NAME:
                directory = directory / name
            write_adapter(directory, self._config_json(name), self.adapter_state_dict(name))

    def adapter_state_dict(self, adapter_name: str) -> dict[str, Tensor]:
        """The adapter's tensors under their file keys (``base_model.model.<module>.<param>``).

        The values are the live parameters: detach or clone them before changing them.
        """
        self._check_known([adapter_name])
        config = self.peft_config[adapter_name]
        state: dict[str, Tensor] = {}
        saved_prefix = KEY_PREFIX
        if adapter_name in self.model_adapters:
            state.update(self.model_adapters[adapter_name].file_tensors(self.model))
            saved_prefix = self.model_adapters[adapter_name].key_prefix
        for path, wrapper in self._wrappers():
            if isinstance(wrapper, AdapterLayer) and adapter_name in wrapper.adapters:
                for name, param in wrapper.adapters[adapter_name].named_parameters():
                    state[f"{KEY_PREFIX}{path}.{name}"] = param
            elif isinstance(wrapper, ModulesToSave) and adapter_name in wrapper.copies:
                for name, param in wrapper.copies[adapter_name].named_parameters():
                    state[f"{saved_prefix}{path}.{name}"] = param
        for key, param in self._trained_biases(adapter_name, getattr(config, "bias", "none")):
            state[KEY_PREFIX + key] = param
        return state

    # ----------------------------------------------------------------------------- running
    def forward(self, *args: Any, adapter_names: Sequence[str] | Routing | None = None, **kwargs: Any) -> Any:
        """The base model's forward with the adapters applied.

        Takes the base model's arguments; ``inspect.signature(model.forward)`` shows them, with
        ``adapter_names`` added.

        Args:
            adapter_names: one adapter name per row of the batch (``"__base__"``: no adapter) to mix
                adapters in one batch; each row then gets what it would get alone. Layer adapters only.
                Or a :meth:`routing` made once for several calls over the same rows.

        An active soft prompt adds its virtual tokens to the inputs here (see :mod:`peftkit.whole_model`).
        """
        for adapter in self._active_model_adapters():
            args, kwargs = adapter.prepare_inputs(self.model, args, kwargs)
        if adapter_names is None:
            return self.model(*args, **kwargs)
        routing = adapter_names if isinstance(adapter_names, Routing) else list(adapter_names)
        with self._routed(routing):
            return self.model(*args, **kwargs)

    def routing(self, adapter_names: Sequence[str]) -> Routing:
        """A per-row routing to pass as ``adapter_names`` to several calls over batches of the same rows.

        Each layer stacks its adapters for a routing on the first call that uses it (the batched LoRA
        path) and the next calls reuse the stacks: a decoding loop outside ``generate`` (a server's
        steps) then pays for stacking once, not once per step. Valid while the adapters do not change:
        make a new one after loading, deleting or training adapters.

        Args:
            adapter_names: one adapter name per row (``"__base__"``: no adapter).

        Raises:
            ValueError: an unknown adapter name.
        """
        names = list(adapter_names)
        self._check_known([name for name in names if name != BASE_ADAPTER_NAME])
        return Routing.from_names(names, next(self.model.parameters()).device)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate``; ``adapter_names`` routes each prompt row as in :meth:`forward`.

        With ``num_beams`` or ``num_return_sequences`` above 1 each name is repeated for its row's copies.
        An active soft prompt starts generation from its virtual tokens.
        """
        for adapter in self._active_model_adapters():
            args, kwargs = adapter.prepare_generate(self.model, args, kwargs)
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        copies = max(kwargs.get("num_beams", 1) or 1, kwargs.get("num_return_sequences", 1) or 1)
        names = [name for name in adapter_names for _ in range(copies)]
        with self._routed(names):
            return self.model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The base model (with peftkit's wrappers inside while adapters are loaded)."""
        return self.model

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Turn on the base model's activation (gradient) checkpointing, non-reentrant by default.

        The non-reentrant variant gives adapter gradients even though the frozen inputs of each
        checkpointed block need no gradient, and reads nothing of the base weights, so it works
        whatever their type. ``transformers.Trainer`` calls this for ``gradient_checkpointing=True``
        (``activation_checkpointing=True``), passing ``gradient_checkpointing_kwargs`` as
        ``activation_checkpointing_kwargs``.

        Raises:
            TypeError: the base model has no checkpointing of its own (not a transformers model).
        """
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        # Passed on only when set, so transformers versions before these options keep working.
        options = {} if (every_n_layers, offload) == (1, False) else {"every_n_layers": every_n_layers}
        if offload:
            options["offload"] = True
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5 names it so
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
        elif hasattr(self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **options)
        else:
            raise TypeError(
                f"{type(self.model).__name__} has no activation checkpointing of its own (transformers "
                "models have it); for another model, wrap its blocks in "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) yourself"
            )

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **options: Any
    ) -> None:
        """The older name of :meth:`activation_checkpointing_enable` (non-reentrant by default)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    # ----------------------------------------------------------------------------- accounting
    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; a tensor shared by two modules counts once."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        """Print e.g. ``trainable: 460,800 (460.80K) of 134,975,808 (134.98M) parameters (0.34%)``."""
        trainable, total = self.trainable_parameters()
        share = format_percent(100 * trainable / total if total else 0.0)
        print(
            f"trainable: {trainable:,} ({format_count(trainable)}) of {total:,} ({format_count(total)}) "
            f"parameters ({share})"
        )

    # ----------------------------------------------------------------------------- internals
    def _wrappers(self) -> Iterator[tuple[str, AdapterLayer | ModulesToSave]]:
        for name, module in self.model.named_modules():
            if isinstance(module, (AdapterLayer, ModulesToSave)):
                yield name, module

    def _check_new_name(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name {adapter_name!r} must be a non-empty string without '.'")
        if adapter_name == BASE_ADAPTER_NAME:
            raise ValueError(f"{BASE_ADAPTER_NAME!r} is reserved for 'no adapter' in adapter_names")
        if adapter_name in self.peft_config:
            raise ValueError(
                f"an adapter named {adapter_name!r} exists already; pick another name, delete_adapter() it, "
                "or replace its values with load_adapter_weights(path, adapter_name)"
            )

    def _active_model_adapters(self) -> list[ModelAdapter]:
        """The active model-level adapter (at most one), unless adapters are disabled."""
        if self._model_adapters_disabled:
            return []
        return [self.model_adapters[name] for name in self._active if name in self.model_adapters]

    def _check_known(self, names: Sequence[str]) -> None:
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")

    def _with_task_head(self, config: AdapterConfig) -> AdapterConfig:
        """For ``task_type="SEQ_CLS"`` the freshly initialised classifier head trains too (as in HF PEFT)."""
        if config.task_type != "SEQ_CLS":
            return config
        saved = tuple(config.modules_to_save or ())
        heads = tuple(n for n in CLASSIFIER_HEAD_NAMES if hasattr(self.model, n) and n not in saved)
        return config.replace(modules_to_save=saved + heads) if heads else config

    def _modules_to_save(self, config: AdapterConfig) -> list[str]:
        if not config.modules_to_save:
            return []
        patterns = list(config.modules_to_save)
        names = [
            name
            for name, module in outer_modules(self.model)
            if name and name_matches(name, patterns) and not isinstance(module, AdapterLayer)
        ]
        if not names:
            raise ValueError(
                f"modules_to_save={patterns} matched no module; give module names such as "
                f"{[name for name, _ in self.model.named_children()]}"
            )
        return names

    def _apply_state(self, active: list[str]) -> None:
        """Set the active adapters on every wrapper and which parameters train."""
        self._active = list(active)
        for name, adapter in self.model_adapters.items():
            if name not in active:
                adapter.deactivate(self.model)
        for name in active:
            if name in self.model_adapters:
                self.model_adapters[name].activate(self.model)
        for param in self.model.parameters():
            param.requires_grad_(False)
        for _, wrapper in self._wrappers():
            wrapper.active_adapters = list(active)
            store = wrapper.adapters if isinstance(wrapper, AdapterLayer) else wrapper.copies
            for name, module in store.items():
                module.requires_grad_(name in active and name in self._trainable)
        # Inactive first: a selective adapter sharing a parameter with the active one must not refreeze it.
        for name, adapter in sorted(self.model_adapters.items(), key=lambda item: item[0] in active):
            adapter.set_trainable(self.model, name in active and name in self._trainable)
        for name in active:
            if name in self._trainable:
                bias = getattr(self.peft_config[name], "bias", "none")
                for _, param in self._trained_biases(name, bias):
                    param.requires_grad_(True)

    def _trained_biases(self, adapter_name: str, bias: str) -> list[tuple[str, nn.Parameter]]:
        """(file key without prefix, parameter) of the base biases an adapter's ``bias`` mode trains."""
        if bias == "none":
            return []
        found = []
        for path, module in outer_modules(self.model):
            if isinstance(module, AdapterLayer):
                param = module.base._parameters.get("bias")
                if param is not None and (bias == "all" or adapter_name in module.adapters):
                    found.append((f"{path}.base_layer.bias", param))
            elif bias == "all" and not isinstance(module, ModulesToSave):
                param = module._parameters.get("bias")
                if param is not None:
                    found.append((f"{path}.bias" if path else "bias", param))
        return found

    def _load_tensors(self, adapter_name: str, tensors: dict[str, Tensor], source: str) -> None:
        expected = self.adapter_state_dict(adapter_name)
        missing = sorted(set(expected) - set(tensors))
        # HF PEFT also saves the full base matrix of targeted embedding layers (resized vocabularies):
        # optional, and loaded into the base module as HF PEFT does.
        base_weights = {
            f"{KEY_PREFIX}{path}.base_layer.weight": wrapper.base.weight
            for path, wrapper in self._wrappers()
            if isinstance(wrapper, AdapterLayer) and adapter_name in wrapper.adapters
        }
        expected.update({key: param for key, param in base_weights.items() if key in tensors})
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} tensor(s) missing from the file, e.g. {missing[:3]}")
            if unexpected:
                parts.append(
                    f"{len(unexpected)} tensor(s) in the file match no module here, e.g. {unexpected[:3]}"
                )
            raise ValueError(
                f"adapter {source!r} does not fit this model: {'; '.join(parts)}. Was it trained on "
                "another base model or with another config?"
            )
        for key, param in expected.items():
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise ValueError(
                    f"adapter {source!r}: tensor {key} has shape {tuple(tensors[key].shape)} in the file "
                    f"but {tuple(param.shape)} here (another rank or base model?)"
                )
        with torch.no_grad():
            for key, param in expected.items():
                param.copy_(tensors[key].to(param.dtype))

    def _config_json(self, adapter_name: str) -> str:
        config = self.peft_config[adapter_name]
        if adapter_name in self.model_adapters:
            config = self.model_adapters[adapter_name].file_config(config)
        # "all-linear", and a regex with layer indices (which HF PEFT refuses), are written as the exact
        # module names they selected: both libraries then adapt the same modules.
        targets = config.target_modules
        if targets == "all-linear" or (isinstance(targets, str) and config.layers_to_transform is not None):
            config = config.replace(target_modules=self._targets[adapter_name])
        name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        if name_or_path and not config.base_model_name_or_path:
            config = config.replace(base_model_name_or_path=name_or_path)
        return config_to_json(config)

    @contextmanager
    def _routed(self, adapter_names: list[str] | Routing) -> Iterator[None]:
        given = adapter_names if isinstance(adapter_names, Routing) else None
        if given is not None:
            adapter_names = [name for name, _ in given.groups]
        self._check_known([name for name in adapter_names if name != BASE_ADAPTER_NAME])
        model_level = sorted(
            {name for name in [*adapter_names, *self._active] if name in self.model_adapters}
        )
        if model_level:
            raise ValueError(
                f"adapter_names (one adapter per row) works with layer adapters only; {model_level} act on "
                "the whole model (soft prompt / selective): run their rows as separate batches"
            )
        if self.merged_adapters:
            raise ValueError("adapter_names cannot be used while adapters are merged; call unmerge_adapter()")
        routing = given or Routing.from_names(adapter_names, next(self.model.parameters()).device)
        wrappers = [wrapper for _, wrapper in self._wrappers()]
        for wrapper in wrappers:
            wrapper.routing = routing
        try:
            yield
        finally:
            for wrapper in wrappers:
                wrapper.routing = None

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


@functools.cache
def _class_for(base_class: type[nn.Module]) -> type[PeftModel]:
    """The PeftModel subclass for bases of ``base_class``: its ``forward`` shows the base's parameters.

    transformers reads a model's inputs from its ``forward``: ``Trainer`` keeps the dataset columns named
    in ``inspect.signature(model.forward)`` and takes label names from ``type(model).forward``, TRL copies
    ``type(model).forward``'s signature. A class per base class serves both readings.
    """
    signature = _forward_signature(base_class)
    if signature is None:
        return PeftModel

    def forward(
        self: PeftModel, *args: Any, adapter_names: Sequence[str] | Routing | None = None, **kwargs: Any
    ) -> Any:
        return PeftModel.forward(self, *args, adapter_names=adapter_names, **kwargs)

    forward.__doc__ = PeftModel.forward.__doc__
    forward.__qualname__ = f"{PeftModel.__qualname__}.forward"
    forward.__signature__ = signature  # type: ignore[attr-defined]
    namespace = {"forward": forward, "__module__": __name__, "__qualname__": PeftModel.__qualname__}
    return type(PeftModel.__name__, (PeftModel,), namespace)


def _forward_signature(base_class: type[nn.Module]) -> inspect.Signature | None:
    """``base_class.forward``'s signature (``self`` first) with PeftModel's keyword-only
    ``adapter_names`` put before any ``**kwargs``; None when it cannot be read or has that name."""
    try:
        signature = inspect.signature(base_class.forward)
    except (TypeError, ValueError):  # a forward inspect cannot read (compiled, built-in)
        return None
    if "adapter_names" in signature.parameters:
        return None
    parameters = list(signature.parameters.values())
    at = next((i for i, p in enumerate(parameters) if p.kind is p.VAR_KEYWORD), len(parameters))
    parameters.insert(at, inspect.signature(PeftModel.forward).parameters["adapter_names"])
    return signature.replace(parameters=parameters)


def _new_peft_model(base_class: type[nn.Module]) -> PeftModel:
    """An empty PeftModel of the class for ``base_class``, for unpickling (see ``PeftModel.__reduce__``)."""
    return nn.Module.__new__(_class_for(base_class))


def _device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((param.device for param in model.parameters()), torch.device("cpu"))


def _original(wrapper: AdapterLayer | ModulesToSave) -> nn.Module:
    return wrapper.base if isinstance(wrapper, AdapterLayer) else wrapper.original


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of any module; a tensor shared by two modules (tied
    embeddings) counts once, as ``nn.Module.parameters`` yields it once."""
    trainable = total = 0
    for param in model.parameters():
        count = _logical_numel(param)
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def _logical_numel(param: nn.Parameter) -> int:
    """Weights a parameter stands for: a bitsandbytes 4-bit weight packs two in each stored byte."""
    state = getattr(param, "quant_state", None)
    if type(param).__name__ == "Params4bit" and state is not None:
        return math.prod(state.shape)
    return param.numel()


def wrap(model: nn.Module, config: AdapterConfig, adapter_name: str = DEFAULT_ADAPTER_NAME) -> PeftModel:
    """Inject a new adapter into ``model`` (changed in place) and return the :class:`PeftModel`.

    Only the adapter's parameters (and what ``bias`` / ``modules_to_save`` add) stay trainable.

    Raises:
        TypeError: ``model`` is a PeftModel already (use its ``add_adapter``).
        ValueError: ``model`` holds peftkit adapters already (an earlier ``wrap`` or ``load`` changed
            it in place: add to the PeftModel it returned), or the config targets nothing (the message
            lists candidate module names).
    """
    _check_unwrapped(model, "model.add_adapter(name, config)")
    peft_model = PeftModel(model)
    peft_model.add_adapter(adapter_name, config)
    return peft_model


def load(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    is_trainable: bool = False,
) -> PeftModel:
    """Load a saved adapter (peftkit's or Hugging Face PEFT's) onto ``model`` (changed in place).

    Args:
        model: the base model the adapter was trained on.
        path: an adapter directory or a Hugging Face Hub repo id.
        adapter_name: the name it gets here.
        is_trainable: keep its parameters trainable to continue training.

    Raises:
        TypeError: ``model`` is a PeftModel already: add the adapter with its ``load_adapter``.
        ValueError: ``model`` holds peftkit adapters already (an earlier ``wrap`` or ``load`` changed
            it in place: add to the PeftModel it returned), or the files do not fit it.
        FileNotFoundError: no adapter at ``path``.
    """
    _check_unwrapped(model, "model.load_adapter(path, adapter_name=...)")
    peft_model = PeftModel(model)
    peft_model.load_adapter(path, adapter_name, is_trainable=is_trainable)
    return peft_model


def _check_module(model: object) -> None:
    """Refuse what is not an ``nn.Module``, naming the usual mistake (``load_model()``'s pair)."""
    if not isinstance(model, nn.Module):
        pair = isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module)
        hint = (
            "; peftkit.models.load_model() returns (model, tokenizer): write "
            "`base, tokenizer = load_model()` and pass `base`"
            if pair
            else ""
        )
        raise TypeError(f"peftkit needs a torch.nn.Module, got {type(model).__name__}{hint}")


def _check_unwrapped(model: nn.Module, instead: str) -> None:
    """Refuse a PeftModel, or a base model that a live PeftModel wraps or that holds peftkit wrappers.

    A second wrapper over the same base would re-freeze the first one's adapters and share (or
    replace) the adapters in its layers. ``instead`` is the call that adds an adapter to the first.
    """
    _check_module(model)
    if isinstance(model, PeftModel):
        raise TypeError(f"model is a PeftModel already; call {instead} instead")
    owner = _WRAPPERS.get(id(model))
    held = owner is not None and owner.model is model and bool(owner.peft_config)  # unload() empties it
    if held or any(isinstance(m, (AdapterLayer, ModulesToSave)) for m in model.modules()):
        raise ValueError(
            "model holds peftkit adapters already (wrap and load change the base model in place); "
            f"call {instead} on the PeftModel they returned, or start from a freshly loaded base model"
        )
