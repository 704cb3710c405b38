"""PeftModel: the adapted model users hold, a facade over its :class:`~peftkit.model.adapter_set.AdapterSet`.

The class is the public surface (Hugging Face PEFT's method names and arguments, the ``nn.Module`` that
training and generation see); the work is done where its state lives: :mod:`.adapter_set` (adding,
removing, activating, merging), :mod:`.files` (adapter files), :mod:`.merging` (``merge_and_unload``),
:mod:`.combining` (``add_weighted_adapter``), :mod:`.running` (``forward``, ``generate``, routings).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from torch import Tensor, nn

from peftkit.arithmetic.settings import Combination
from peftkit.arithmetic.weighted import CombinationReport
from peftkit.core.adapter_config import AdapterConfig
from peftkit.core.layer import AdapterLayer, ModulesToSave
from peftkit.core.whole_model import ModelAdapter
from peftkit.foundation.formatting import format_count, format_percent
from peftkit.foundation.quantization import keep_trainable_layout, logical_numel
from peftkit.model import files
from peftkit.model.adapter_set import AdapterSet
from peftkit.model.combining import add_combination
from peftkit.model.files import DEFAULT_ADAPTER_NAME
from peftkit.model.merging import merge_and_unload
from peftkit.model.plain_trainer import warn_if_plain_trainer_saves
from peftkit.model.running import Running
from peftkit.model.signature import subclass_for

# The live PeftModel of each base model (by id), so a second wrap or load of the same base is refused
# even when its adapters change no module (soft prompts, selective). Weak: a dropped wrapper leaves it.
_WRAPPERS: weakref.WeakValueDictionary[int, PeftModel] = weakref.WeakValueDictionary()


class PeftModel(Running, nn.Module):
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
            cls = subclass_for(PeftModel, type(model))  # the base's forward signature (signature.py)
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
        self.model_adapters = nn.ModuleDict()
        self._adapters = AdapterSet(model, self.model_adapters)

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        """Adapter name → its config, in the order the adapters were added."""
        return self._adapters.configs

    @property
    def _hf_peft_config_loaded(self) -> bool:
        """transformers' flag for "adapters are attached": its Trainer refuses to fine-tune a quantized
        model without them (``validate_quantization_for_training``), and would otherwise read the
        base model's ``False`` through :meth:`__getattr__`."""
        return bool(self._adapters.configs)

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
        self._adapters.add(adapter_name, config, trainable, strict_targets)

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
        self._adapters.check_activatable(names)
        self._adapters.activate(names)

    @property
    def active_adapters(self) -> list[str]:
        """The names of the adapters in use, in the order they apply."""
        return list(self._adapters.active)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; a module left with no adapter gets its original back.

        Raises:
            ValueError: an unknown name, or the adapter is merged (unmerge first).
        """
        self._adapters.remove(adapter_name)

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
        combination = Combination(
            weights, combination_type, svd_rank, svd_clamp, density, majority_sign_method, seed
        )
        return add_combination(self._adapters, adapter_name, adapters, combination, overwrite)

    def disable_adapters(self) -> AbstractContextManager[None]:
        """Inside this block the model computes exactly what the base model computes.

        Merged adapters are taken out for the block and merged back after it.
        """
        return self._adapters.disabled()

    # ----------------------------------------------------------------------------- files
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``nn.Module.state_dict``; called by a plain ``transformers.Trainer`` to save the whole model,
        it first warns once that ``peftkit.integrations.Trainer`` saves the adapter instead."""
        warn_if_plain_trainer_saves()
        return super().state_dict(*args, **kwargs)

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
        files.load_adapter(self._adapters, path, adapter_name, is_trainable)

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
        files.load_adapter_weights(self._adapters, path, adapter_name)

    def save_pretrained(
        self, save_directory: str | os.PathLike[str], selected_adapters: Sequence[str] | None = None
    ) -> None:
        """Write each adapter as Hugging Face PEFT does: ``adapter_config.json`` and
        ``adapter_model.safetensors`` in ``save_directory`` for ``"default"``, in
        ``save_directory/<name>/`` for any other name. Each file is written atomically.
        """
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        files.save_adapters(self._adapters, save_directory, names)

    def adapter_state_dict(self, adapter_name: str) -> dict[str, Tensor]:
        """The adapter's tensors under their file keys (``base_model.model.<module>.<param>``).

        The values are the live parameters: detach or clone them before changing them.
        """
        return files.adapter_state_dict(self._adapters, adapter_name)

    # ----------------------------------------------------------------------------- merging
    @property
    def merged_adapters(self) -> list[str]:
        """Adapters currently folded into the base weights, in merge order."""
        return self._adapters.merged

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
        self._adapters.merge(names, safe=safe_merge)

    def unmerge_adapter(self) -> None:
        """Take every merged adapter back out of the base weights."""
        self._adapters.unmerge()

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
        return merge_and_unload(self, self._adapters, names, safe_merge, requantize, probe)

    def unload(self) -> nn.Module:
        """Remove every adapter (unmerging first) and return the original base model."""
        self._adapters.unmerge()
        return self._adapters.unwrap(keep_copies_of=[])

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

    # ----------------------------------------------------------------------------- for running.py
    # Running reads the adapters' state through these (it is left as it was while the serving work on
    # routing moves that code).
    @property
    def _active(self) -> list[str]:
        return self._adapters.active

    def _check_known(self, names: Sequence[str]) -> None:
        self._adapters.check_known(names)

    def _wrappers(self) -> Iterator[tuple[str, AdapterLayer | ModulesToSave]]:
        return self._adapters.wrappers()

    def _active_model_adapters(self) -> list[ModelAdapter]:
        return self._adapters.active_model_adapters()


def _new_peft_model(base_class: type[nn.Module]) -> PeftModel:
    """An empty PeftModel of the class for ``base_class``, for unpickling (see ``PeftModel.__reduce__``)."""
    return nn.Module.__new__(subclass_for(PeftModel, base_class))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of any module; a tensor shared by two modules (tied
    embeddings) counts once, as ``nn.Module.parameters`` yields it once."""
    trainable = total = 0
    for param in model.parameters():
        count = logical_numel(param)
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


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
