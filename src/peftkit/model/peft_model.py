"""PeftModel: a base model with named adapters injected; adding, switching, deleting and counting them
(files, merging and running are its mixins: :mod:`.files`, :mod:`.merging`, :mod:`.running`)."""

from __future__ import annotations

import copy
import functools
import inspect
import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from peftkit.arithmetic import CombinationReport, combine_lora_adapters
from peftkit.core.adapter_config import AdapterConfig
from peftkit.core.layer import BASE_ADAPTER_NAME, AdapterLayer, ModulesToSave, outer_modules
from peftkit.core.targeting import CLASSIFIER_HEAD_NAMES, find_targets, name_matches
from peftkit.core.whole_model import ModelAdapter, is_model_level
from peftkit.foundation.formatting import format_count, format_percent
from peftkit.foundation.quantization import keep_trainable_layout
from peftkit.model.files import Files
from peftkit.model.merging import Merging
from peftkit.model.routing import Routing
from peftkit.model.running import Running

# The live PeftModel of each base model (by id), so a second wrap or load of the same base is refused
# even when its adapters change no module (soft prompts, selective). Weak: a dropped wrapper leaves it.
_WRAPPERS: weakref.WeakValueDictionary[int, PeftModel] = weakref.WeakValueDictionary()


class PeftModel(Files, Merging, Running, nn.Module):
    """A base model whose targeted modules carry named adapters.

    The base model is changed in place: each targeted module is replaced by a wrapper that keeps the
    original as ``base``. Attributes the wrapper lacks (``config``, ``generation_config``…) are read
    from the base model, so a wrapped transformers model keeps working where one is expected.
    ``PeftModel(model)`` is an instance of a subclass made once per base-model class whose ``forward``
    shows the base's parameters plus ``adapter_names`` (what ``inspect.signature`` and
    ``transformers.Trainer`` read: the dataset columns it keeps, the label names); it behaves as this class.
    Model-level methods (soft prompts, selective) wrap nothing: their adapters live in
    ``model_adapters`` and act through the hooks of :class:`~peftkit.core.whole_model.ModelAdapter`; at most
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
        for name, module in outer_modules(self.model):  # wrappers are never nested (targeting skips them)
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


def _check_module(model: object) -> None:
    """Refuse what is not an ``nn.Module``, naming the usual mistake (``load_model()``'s pair)."""
    if not isinstance(model, nn.Module):
        pair = isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module)
        hint = (
            "; peftkit.foundation.loading.load_model() returns (model, tokenizer): write "
            "`base, tokenizer = load_model()` and pass `base`"
            if pair
            else ""
        )
        raise TypeError(f"peftkit needs a torch.nn.Module, got {type(model).__name__}{hint}")
