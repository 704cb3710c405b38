"""``add_weighted_adapter``: a combination of LoRA adapters (:mod:`peftkit.arithmetic`) added as one more."""

from __future__ import annotations

from collections.abc import Sequence

from peftkit.arithmetic.settings import Combination
from peftkit.arithmetic.weighted import CombinationReport, combine_lora_adapters
from peftkit.model.adapter_set import AdapterSet
from peftkit.model.files import load_tensors


def add_combination(
    adapters: AdapterSet, adapter_name: str, sources: Sequence[str], combination: Combination, overwrite: bool
) -> CombinationReport:
    """Add ``adapter_name``, the combination of the adapters ``sources``, inactive; the active adapters
    stay as they were (see ``PeftModel.add_weighted_adapter``).

    Raises:
        ValueError: an existing name without ``overwrite``, a merged one, or what
            :func:`~peftkit.arithmetic.weighted.combine_lora_adapters` refuses; nothing changes then.
    """
    replacing = adapter_name in adapters.configs
    if replacing and not overwrite:
        raise ValueError(
            f"an adapter named {adapter_name!r} exists already; pick another name or pass overwrite=True"
        )
    if replacing and adapter_name in adapters.merged:
        raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() before replacing it")
    if not replacing:
        adapters.check_new_name(adapter_name)
    config, tensors, report = combine_lora_adapters(adapters.model, adapters.configs, sources, combination)
    active = list(adapters.active)
    if replacing:
        adapters.remove(adapter_name)
    adapters.add(adapter_name, config, trainable=True, strict_targets=True)
    load_tensors(adapters, adapter_name, tensors, source=f"add_weighted_adapter({adapter_name!r})")
    adapters.activate(active)
    return report
