"""The adapters of one base model and their state: :class:`AdapterSet`, what a PeftModel holds."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from peftkit.core.adapter_config import AdapterConfig
from peftkit.core.layer import BASE_ADAPTER_NAME, AdapterLayer, ModulesToSave, outer_modules
from peftkit.core.whole_model import ModelAdapter
from peftkit.foundation.quantization import is_quantized
from peftkit.model.injection import Injection, build_injection

Wrapper = AdapterLayer | ModulesToSave


class AdapterSet:
    """The adapters injected into one base model: which exist, which are active, trainable and merged.

    Layer adapters live inside the model, in the wrappers that replaced their modules
    (:class:`~peftkit.core.layer.AdapterLayer`, :class:`~peftkit.core.layer.ModulesToSave`); model-level
    adapters (soft prompts, selective) in ``model_adapters``, outside it, so the base's parameter names
    never change. Which adapters are active and which parameters train is set in one place,
    :meth:`activate`, and derived there from scratch each time; which are merged is read from the
    wrappers and the model-level adapters, never stored twice.

    Args:
        model: the base model, changed in place as adapters come and go.
        model_adapters: where the model-level adapters are kept (the PeftModel registers it as a
            submodule, so they move and save with it).
    """

    def __init__(self, model: nn.Module, model_adapters: nn.ModuleDict) -> None:
        self.model = model
        self.model_adapters = model_adapters
        self.configs: dict[str, AdapterConfig] = {}
        self.targets: dict[str, list[str]] = {}  # the module paths each layer adapter was injected into
        self.trainable: set[str] = set()
        self.active: list[str] = []
        self.model_level_disabled = False

    # ----------------------------------------------------------------------------- reading
    def wrappers(self) -> Iterator[tuple[str, Wrapper]]:
        """``(path, wrapper)`` for every peftkit wrapper in the model, in module order."""
        for name, module in outer_modules(self.model):  # wrappers are never nested (targeting skips them)
            if isinstance(module, (AdapterLayer, ModulesToSave)):
                yield name, module

    def layers(self) -> list[AdapterLayer]:
        """The wrapped layers (not the ``modules_to_save`` copies), in module order."""
        return [wrapper for _, wrapper in self.wrappers() if isinstance(wrapper, AdapterLayer)]

    @property
    def merged(self) -> list[str]:
        """Adapters currently folded into the base weights, in merge order."""
        merged: list[str] = []
        for layer in self.layers():
            merged += [name for name in layer.merged_adapters if name not in merged]
        return merged + [name for name, adapter in self.model_adapters.items() if adapter.merged]

    def active_model_adapters(self) -> list[ModelAdapter]:
        """The active model-level adapter (at most one), unless adapters are disabled."""
        if self.model_level_disabled:
            return []
        return [self.model_adapters[name] for name in self.active if name in self.model_adapters]

    def trained_biases(self, adapter_name: str) -> list[tuple[str, nn.Parameter]]:
        """(file key without prefix, parameter) of the base biases the adapter's ``bias`` mode trains."""
        bias = getattr(self.configs[adapter_name], "bias", "none")
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

    def check_known(self, names: Sequence[str]) -> None:
        """Raises ValueError naming the adapters of ``names`` this model does not have."""
        unknown = [name for name in names if name not in self.configs]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.configs)}")

    def check_new_name(self, adapter_name: str) -> None:
        """Raises ValueError for a name that is malformed, reserved or taken."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name {adapter_name!r} must be a non-empty string without '.'")
        if adapter_name == BASE_ADAPTER_NAME:
            raise ValueError(f"{BASE_ADAPTER_NAME!r} is reserved for 'no adapter' in adapter_names")
        if adapter_name in self.configs:
            raise ValueError(
                f"an adapter named {adapter_name!r} exists already; pick another name, delete_adapter() it, "
                "or replace its values with load_adapter_weights(path, adapter_name)"
            )

    # ----------------------------------------------------------------------------- adding, removing
    def add(self, adapter_name: str, config: AdapterConfig, trainable: bool, strict_targets: bool) -> None:
        """Build the adapter and put it in place (see ``PeftModel.add_adapter``); a failing
        initialisation removes it again."""
        self.check_new_name(adapter_name)
        injection = build_injection(self.model, config, strict_targets, self.active_model_adapters())
        self._place(adapter_name, injection)
        if trainable:
            self.trainable.add(adapter_name)
        self.activate(self.active or [adapter_name])
        try:
            injection.config.initialize(self.model, adapter_name)
        except Exception:
            self.remove(adapter_name)  # leave the model as it was
            raise

    def _place(self, adapter_name: str, injection: Injection) -> None:
        if injection.model_adapter is not None:
            self.model_adapters[adapter_name] = injection.model_adapter
        for name, adapter in injection.layer_adapters.items():
            module = self.model.get_submodule(name)
            if not isinstance(module, AdapterLayer):
                module = AdapterLayer(module)
                self.model.set_submodule(name, module)
            module.adapters[adapter_name] = adapter
        for name in injection.saved:
            module = self.model.get_submodule(name)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                self.model.set_submodule(name, module)
            module.copies[adapter_name] = copy.deepcopy(module.original)
        self.configs[adapter_name] = injection.config
        self.targets[adapter_name] = injection.targets

    def remove(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; a module left with no adapter gets its original back.

        Raises:
            ValueError: an unknown name, or the adapter is merged.
        """
        self.check_known([adapter_name])
        if adapter_name in self.merged:
            raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it")
        for name, wrapper in list(self.wrappers()):
            store = _store(wrapper)
            if adapter_name in store:
                del store[adapter_name]
            if len(store) == 0:
                self.model.set_submodule(name, _original(wrapper))
        if adapter_name in self.model_adapters:
            self.model_adapters[adapter_name].release(self.model, keep_values=False)
            del self.model_adapters[adapter_name]
        del self.configs[adapter_name]
        del self.targets[adapter_name]
        self.trainable.discard(adapter_name)
        remaining = [name for name in self.active if name != adapter_name]
        self.activate(remaining or list(self.configs)[:1])

    def unwrap(self, keep_copies_of: list[str]) -> nn.Module:
        """Take every wrapper out (a ``modules_to_save`` copy of ``keep_copies_of`` replaces its
        original), release the model-level adapters and forget them all; returns the base model."""
        for name, adapter in self.model_adapters.items():
            adapter.release(self.model, keep_values=name in keep_copies_of and adapter.merged)
        self.model_adapters.clear()
        for name, wrapper in list(self.wrappers()):
            if isinstance(wrapper, ModulesToSave):
                kept = [n for n in keep_copies_of if n in wrapper.copies]
                self.model.set_submodule(name, wrapper.copies[kept[0]] if kept else wrapper.original)
            else:
                self.model.set_submodule(name, wrapper.base)
        self.configs.clear()
        self.targets.clear()
        self.trainable.clear()
        self.active = []
        return self.model

    # ----------------------------------------------------------------------------- activating
    def check_activatable(self, names: list[str]) -> None:
        """Refuse a set of active adapters that cannot run together (see ``PeftModel.set_adapter``)."""
        self.check_known(names)
        model_level = [name for name in names if name in self.model_adapters]
        if len(model_level) > 1:
            raise ValueError(
                f"adapters {model_level} are model-level (soft prompt / selective) and only one of them can "
                "be active at a time; activate one, possibly together with layer adapters such as LoRA"
            )
        if self.merged:
            raise ValueError(
                f"adapters {self.merged} are merged into the weights; call unmerge_adapter() before "
                "set_adapter()"
            )
        for path, wrapper in self.wrappers():
            # applied unmerged, two input scalings (IA³ feed-forward) would add up where the maths (and
            # merging) multiplies them
            adapters = wrapper.adapters if isinstance(wrapper, AdapterLayer) else {}
            scaling = [n for n in names if n in adapters and getattr(adapters[n], "scales_input", False)]
            if len(scaling) > 1:
                raise ValueError(
                    f"adapters {scaling} both scale the input of {path} (IA³ feed-forward) and cannot be "
                    f"active together unmerged; activate one at a time, or fold them into the weights "
                    f"with merge_adapter({scaling})"
                )

    def activate(self, active: list[str]) -> None:
        """Make ``active`` the active adapters on every wrapper and derive which parameters train: the
        whole base frozen, then the active, trainable adapters' parameters (and the biases their
        ``bias`` mode trains) enabled."""
        self.active = list(active)
        for name, adapter in self.model_adapters.items():
            if name not in active:
                adapter.deactivate(self.model)
        for name in active:
            if name in self.model_adapters:
                self.model_adapters[name].activate(self.model)
        for param in self.model.parameters():
            param.requires_grad_(False)
        for _, wrapper in self.wrappers():
            wrapper.active_adapters = list(active)
            for name, module in _store(wrapper).items():
                module.requires_grad_(name in active and name in self.trainable)
        # Inactive first: a selective adapter sharing a parameter with the active one must not refreeze it.
        for name, adapter in sorted(self.model_adapters.items(), key=lambda item: item[0] in active):
            adapter.set_trainable(self.model, name in active and name in self.trainable)
        for name in active:
            if name in self.trainable:
                for _, param in self.trained_biases(name):
                    param.requires_grad_(True)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model's behaviour for the block: merged adapters taken out and merged back after."""
        merged = self.merged
        self.unmerge()
        wrappers = [wrapper for _, wrapper in self.wrappers()]
        for wrapper in wrappers:
            wrapper.disabled = True
        model_level = self.active_model_adapters()
        for adapter in model_level:
            adapter.deactivate(self.model)
        self.model_level_disabled = True
        try:
            yield
        finally:
            for wrapper in wrappers:
                wrapper.disabled = False
            self.model_level_disabled = False
            for adapter in model_level:
                adapter.activate(self.model)
            if merged:
                self.merge(merged)

    # ----------------------------------------------------------------------------- merging
    def merge(self, names: list[str], safe: bool = False) -> None:
        """Fold the named adapters into the base weights; on any failure what this call merged is taken
        out again (see ``PeftModel.merge_adapter``)."""
        self.check_known(names)
        quantized = [
            path
            for path, w in self.wrappers()
            if isinstance(w, AdapterLayer) and is_quantized(w.base) and set(names) & set(w.adapters)
        ]
        if quantized:
            raise ValueError(
                f"cannot merge into the 4-bit/8-bit weights of {quantized[0]} in place (re-quantizing "
                "would change them); merge_and_unload() returns a dequantized model with the adapter merged"
            )
        model_level = [self.model_adapters[name] for name in names if name in self.model_adapters]
        layers = self.layers()
        merged_before = [len(layer.merged_adapters) for layer in layers]
        merged_model_level: list[ModelAdapter] = []
        try:
            for adapter in model_level:  # first: a method that cannot merge refuses before anything changes
                if not adapter.merged:
                    adapter.merge(self.model)
                    merged_model_level.append(adapter)
            for layer in layers:
                layer.merge(names, safe=safe)
        except Exception:
            for layer, count in zip(layers, merged_before, strict=True):
                layer.unmerge(keep=count)
            for adapter in merged_model_level:
                adapter.unmerge(self.model)
            raise

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weights."""
        for layer in self.layers():
            layer.unmerge()
        for adapter in self.model_adapters.values():
            adapter.unmerge(self.model)


def _store(wrapper: Wrapper) -> nn.ModuleDict:
    """The wrapper's per-adapter modules: a layer's adapters, or the trained copies of a module."""
    return wrapper.adapters if isinstance(wrapper, AdapterLayer) else wrapper.copies


def _original(wrapper: Wrapper) -> nn.Module:
    return wrapper.base if isinstance(wrapper, AdapterLayer) else wrapper.original
