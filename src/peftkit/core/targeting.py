"""Targeting: which modules of a model an adapter config selects. One function, every method."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Sequence

from torch import nn

from peftkit.core.adapter_config import AdapterConfig
from peftkit.core.layer import AdapterLayer, ModulesToSave, outer_modules
from peftkit.foundation.errors import closest
from peftkit.foundation.modules import is_conv1d

MAX_CANDIDATES_SHOWN = 20


def adaptable_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every module a method could wrap.

    A module already wrapped by peftkit is reported under its own name as its original module (so a
    second adapter lands in the same wrapper); the wrapper's insides are skipped.
    """
    for name, module in outer_modules(model):
        if isinstance(module, AdapterLayer):
            yield name, module.base
        elif isinstance(module, ModulesToSave):
            yield name, module.original
        elif name:
            yield name, module


def name_matches(name: str, patterns: str | Sequence[str]) -> bool:
    """Whether a module name is selected by ``patterns``.

    Args:
        name: a dotted module name, e.g. ``model.layers.0.self_attn.q_proj``.
        patterns: a string is a regular expression that must match the whole name; a sequence holds
            exact names or suffixes after a dot (``"q_proj"``, ``"self_attn.q_proj"``).
    """
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The block index in a module name (``model.layers.3.mlp`` → 3), or None when there is none.

    Without ``layers_pattern`` the first ``<list name>.<number>.`` in the name is used.
    """
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    for pattern in patterns or [r"[^.]+"]:
        match = re.search(rf"(?:^|\.){pattern}\.(\d+)(?:\.|$)", name)
        if match is not None:
            return int(match.group(1))
    return None


CLASSIFIER_HEAD_NAMES = ("score", "classifier")


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output head, which ``"all-linear"`` leaves out.

    The head is ``get_output_embeddings()`` (a language model's ``lm_head``), else a top-level
    ``score`` or ``classifier`` module (transformers' classification models): a task head is trained
    whole through ``modules_to_save``, not given a low-rank update.
    """
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is None:
        head = next((getattr(model, n) for n in CLASSIFIER_HEAD_NAMES if hasattr(model, n)), None)
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


def find_targets(
    model: nn.Module,
    config: AdapterConfig,
    is_supported: Callable[[nn.Module], bool] | None = None,
    strict: bool = True,
) -> list[str]:
    """The names of the modules ``config`` selects in ``model``, in model order.

    Args:
        model: any ``nn.Module``; a transformers model's output head is known through
            ``get_output_embeddings``.
        config: its ``target_modules``, ``exclude_modules``, ``layers_to_transform`` and
            ``layers_pattern`` are applied, in that order.
        is_supported: which module types can be adapted; defaults to ``config.is_supported``.
        strict: every entry of a ``target_modules`` list must match a module (a misspelt entry would
            otherwise adapt fewer modules than asked, silently); False warns instead, for files
            written for another model.

    Raises:
        ValueError: ``target_modules`` is unset, the selection is empty, or (``strict``) an entry of
            the list matches nothing. The message names the field or entry, the closest module name,
            and lists up to 20 candidate names of supported types.
    """
    is_supported = is_supported or config.is_supported
    candidates = [(name, m) for name, m in adaptable_modules(model) if is_supported(m)]
    if config.target_modules is None:
        raise ValueError(
            f"{type(config).__name__}.target_modules is not set; name the modules to adapt, "
            f"e.g. {_candidate_hint(candidates)}, or use 'all-linear'"
        )
    selected = _matching_targets(model, config, candidates, strict)
    if config.exclude_modules is not None:
        selected = [name for name in selected if not name_matches(name, config.exclude_modules)]
        if not selected:
            raise ValueError(
                f"exclude_modules={_show(config.exclude_modules)} excluded every module that "
                f"target_modules={_show(config.target_modules)} selected; narrow the exclusion"
            )
    if config.layers_to_transform is not None:
        selected = _in_layers(selected, config.layers_to_transform, config.layers_pattern)
    return selected


def _matching_targets(
    model: nn.Module, config: AdapterConfig, candidates: list[tuple[str, nn.Module]], strict: bool
) -> list[str]:
    """The candidates ``config.target_modules`` selects (``"all-linear"``: every linear layer but the
    output head); raises ValueError when none is (or, ``strict``, an entry of the list matches nothing)."""
    if config.target_modules == "all-linear":
        heads = output_head_names(model)
        selected = [
            name
            for name, m in candidates
            if (isinstance(m, nn.Linear) or is_conv1d(m))
            and not any(name == head or name.startswith(head + ".") for head in heads)
        ]
    else:
        selected = [name for name, _ in candidates if name_matches(name, config.target_modules)]
        if selected and not isinstance(config.target_modules, str):
            _check_every_entry_matches(config.target_modules, candidates, strict)
    if not selected:
        raise ValueError(
            f"target_modules={_show(config.target_modules)} matched no module of a supported type; "
            f"candidates: {_candidate_hint(candidates)}"
        )
    return selected


def _in_layers(
    selected: list[str], layers: int | Sequence[int], layers_pattern: str | Sequence[str] | None
) -> list[str]:
    """The names of ``selected`` in the decoder layers of index ``layers`` (``layers_to_transform``);
    raises ValueError when that keeps none, with the indices found."""
    wanted = {layers} if isinstance(layers, int) else set(layers)
    indexed = [(name, layer_index(name, layers_pattern)) for name in selected]
    kept = [name for name, index in indexed if index in wanted]
    if not kept:
        found = sorted({index for _, index in indexed if index is not None})
        indices = found or "not found (set layers_pattern, e.g. 'layers' or 'h')"
        raise ValueError(
            f"layers_to_transform={sorted(wanted)} kept none of the targeted modules; their layer "
            f"indices are {indices}"
        )
    return kept


def _check_every_entry_matches(
    entries: Sequence[str], candidates: list[tuple[str, nn.Module]], strict: bool
) -> None:
    """Raise (``strict``) or warn for each ``target_modules`` entry that matches no candidate."""
    names = [name for name, _ in candidates]
    for entry in entries:
        if any(name_matches(name, [entry]) for name in names):
            continue
        short = sorted({name.rsplit(".", 1)[-1] for name in names} | set(names))
        message = (
            f"target_modules entry {entry!r} matches no module of a supported type"
            f"{closest(entry, short)}; candidates: {_candidate_hint(candidates)}"
        )
        if strict:
            raise ValueError(message)
        warnings.warn(f"{message}; the other entries are adapted", stacklevel=3)


def _show(patterns: str | Sequence[str]) -> str:
    return repr(patterns) if isinstance(patterns, str) else repr(list(patterns))


def _candidate_hint(candidates: list[tuple[str, nn.Module]]) -> str:
    """Up to 20 distinct short names with type and count, e.g. ``q_proj (Linear x2)``."""
    if not candidates:
        return "(none: the model has no module of a supported type)"
    counts: dict[tuple[str, str], int] = {}
    for name, module in candidates:
        key = (name.rsplit(".", 1)[-1], type(module).__name__)
        counts[key] = counts.get(key, 0) + 1
    shown = [f"{short} ({kind} x{n})" for (short, kind), n in list(counts.items())[:MAX_CANDIDATES_SHOWN]]
    more = len(counts) - len(shown)
    return ", ".join(shown) + (f", ... and {more} more" if more > 0 else "")
