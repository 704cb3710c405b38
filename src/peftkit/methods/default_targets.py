"""Which modules a method adapts when ``target_modules`` is not given, per architecture.

Hugging Face PEFT keeps a table from a transformers ``model_type`` to module names per method (its
``utils/constants.py``); peftkit does the same with roles instead of per-method lists: an architecture
names its attention projections, the projections that make keys and values, and the feed-forward
output projection. LoRA, DoRA and selective fine-tuning default to the attention projections (all of
them: queries, keys, values and the output, as ``peftkit train`` has always trained on Llama); IA³ to
the keys, values and feed-forward output, scaling the feed-forward output's input.

A model whose ``model_type`` is not in :data:`ARCHITECTURES` (or whose module names are not the ones
listed) gets the same roles from its structure: in each list of repeated blocks, the first sub-module
holding linear layers that read and write the hidden width is the attention (it comes before the
feed-forward in every transformer layout we know); its layers are the attention projections, the
second and third that read the hidden width are keys and values (or the one fused projection), and the
layers outside it that write the hidden width from a wider input are the feed-forward outputs.

The modules found are written back as short names where those select exactly them (``["q_proj",
"k_proj", "v_proj", "o_proj"]``), else as one full-match regular expression (BERT's feed-forward output,
``layer.<i>.output.dense``, shares its suffix with ``attention.output.dense``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from peftkit.core.targeting import adaptable_modules
from peftkit.foundation.modules import is_conv1d

__all__ = ["ARCHITECTURES", "DefaultTargets", "Roles", "attention_targets", "ia3_targets", "target_rule"]


@dataclass(frozen=True)
class Roles:
    """Module names of one architecture, as full-match regular expressions of a name's last parts.

    Attributes:
        attention: the attention projections (queries, keys, values, output; fused where they are).
        keys_values: the projections that make keys and values.
        feedforward_out: the feed-forward output projection.
    """

    attention: tuple[str, ...]
    keys_values: tuple[str, ...]
    feedforward_out: tuple[str, ...]


_LLAMA = Roles((r"q_proj", r"k_proj", r"v_proj", r"o_proj"), (r"k_proj", r"v_proj"), (r"down_proj",))
_GPT2 = Roles((r"attn\.c_attn", r"attn\.c_proj"), (r"attn\.c_attn",), (r"mlp\.c_proj",))
_BERT = Roles(
    (r"query", r"key", r"value", r"attention\.output\.dense"),
    (r"key", r"value"),
    (r"layer\.\d+\.output\.dense",),
)
_T5 = Roles((r"q", r"k", r"v", r"o"), (r"k", r"v"), (r"wo",))
_OPT = Roles((r"q_proj", r"k_proj", r"v_proj", r"out_proj"), (r"k_proj", r"v_proj"), (r"fc2",))
_NEOX = Roles((r"query_key_value", r"attention\.dense"), (r"query_key_value",), (r"dense_4h_to_h",))

#: ``model_type`` → the names of its roles. Others: found from the structure (module docstring).
ARCHITECTURES: dict[str, Roles] = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite"),
        _LLAMA,
    ),
    "phi3": Roles((r"qkv_proj", r"o_proj"), (r"qkv_proj",), (r"down_proj",)),
    **dict.fromkeys(("gpt2", "gpt_bigcode"), _GPT2),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _BERT),
    "distilbert": Roles((r"q_lin", r"k_lin", r"v_lin", r"out_lin"), (r"k_lin", r"v_lin"), (r"ffn\.lin2",)),
    **dict.fromkeys(("t5", "mt5"), _T5),
    **dict.fromkeys(("opt", "bart"), _OPT),
    "gpt_neox": _NEOX,
    "falcon": Roles(
        (r"query_key_value", r"self_attention\.dense"), (r"query_key_value",), (r"dense_4h_to_h",)
    ),
}


@dataclass(frozen=True)
class DefaultTargets:
    """A method's default targets in one model, and the rule that chose them (what ``inspect`` shows)."""

    target_modules: str | list[str]
    feedforward_modules: str | list[str] | None
    rule: str


def attention_targets(model: nn.Module, candidates: Sequence[str]) -> DefaultTargets:
    """The attention projections of ``model`` (LoRA's, DoRA's and selective fine-tuning's default).

    Args:
        candidates: the names of the modules the method can adapt (its ``is_supported`` ones).

    Raises:
        ValueError: no attention projections found (the message says to name ``target_modules``).
    """
    roles, rule = _roles(model)
    return DefaultTargets(_compact(roles["attention"], candidates), None, rule)


def ia3_targets(model: nn.Module, candidates: Sequence[str]) -> DefaultTargets:
    """IA³'s default: keys, values and the feed-forward output (whose input is scaled).

    Raises:
        ValueError: the roles cannot be found (the message says to name ``target_modules``).
    """
    roles, rule = _roles(model)
    if not roles["feedforward_out"]:
        raise ValueError(f"found no feed-forward output projection ({rule}); name IA³'s target_modules")
    targets = [name for name in candidates if name in {*roles["keys_values"], *roles["feedforward_out"]}]
    feedforward = _compact(roles["feedforward_out"], candidates)
    return DefaultTargets(_compact(targets, candidates), feedforward, rule)


def target_rule(model: nn.Module) -> str:
    """In words, how the default targets of ``model`` are chosen: the table's names for its
    ``model_type``, or its structure (what ``peftkit inspect`` shows).

    Raises:
        ValueError: neither finds attention projections.
    """
    return _roles(model)[1]


def _roles(model: nn.Module) -> tuple[dict[str, list[str]], str]:
    """Role → full module names, and the rule in words: the table's names where they are found, else
    the structure's."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = [name for name, module in adaptable_modules(model) if _is_linear(module)]
    listed = ARCHITECTURES.get(model_type or "")
    if listed is not None:
        found = {
            role: [name for name in names if _matches(name, getattr(listed, role))]
            for role in ("attention", "keys_values", "feedforward_out")
        }
        if found["attention"]:
            return found, f"peftkit's names for model_type {model_type!r}"
    what = (
        f"model_type {model_type!r} is not in peftkit's table" if model_type else "not a transformers model"
    )
    found, width = _structural_roles(model)
    if not found["attention"]:
        raise ValueError(
            f"target_modules is not set and peftkit found no attention projections in "
            f"{type(model).__name__} ({what}, and no block of layers reads and writes one width); "
            "name the modules to adapt in target_modules"
        )
    return (
        found,
        f"{what}: found by shape and position (in each block, the first sub-layer that reads and "
        f"writes the hidden width, {width})",
    )


def _structural_roles(model: nn.Module) -> tuple[dict[str, list[str]], int | None]:
    """The roles found from the structure (module docstring), and the hidden width used."""
    found: dict[str, list[str]] = {"attention": [], "keys_values": [], "feedforward_out": []}
    width = _hidden_width(model)
    if width is None:
        return found, None
    for list_name, blocks in _block_lists(model):
        first = _sublayers(blocks[0])
        attention = next((layers for layers in first if _reads_and_writes(layers, width)), None)
        if attention is None:
            continue
        in_attention = {name for name, _ in attention}
        readers = [name for name, m in attention[:-1] if _features(m)[0] == width]
        keys_values = readers[1:3] if len(readers) > 1 else readers
        outputs = [
            name
            for layers in first
            for name, m in layers
            if name not in in_attention and _features(m)[1] == width and _features(m)[0] != width
        ]
        for index in range(len(blocks)):
            prefix = f"{list_name}.{index}."
            found["attention"] += [prefix + name for name, _ in attention]
            found["keys_values"] += [prefix + name for name in keys_values]
            found["feedforward_out"] += [prefix + name for name in outputs]
    return found, width


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The outermost ``nn.ModuleList``s of blocks that hold linear layers (T5: encoder and decoder)."""
    lists: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(outer + ".") for outer, _ in lists)
        blocks = isinstance(module, nn.ModuleList) and len(module) and not inside
        if blocks and any(_is_linear(m) for m in module[0].modules()):
            lists.append((name, module))
    return lists


def _sublayers(block: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """The linear layers of ``block`` grouped by its children in order (a child that is a list of
    sub-layers, T5's ``layer``, counts as its items); names relative to ``block``."""
    groups = []
    for child_name, child in block.named_children():
        parts = list(child.named_children()) if isinstance(child, nn.ModuleList) else [("", child)]
        for part_name, part in parts:
            prefix = ".".join(p for p in (child_name, part_name) if p)
            layers = [(f"{prefix}.{n}" if n else prefix, m) for n, m in part.named_modules() if _is_linear(m)]
            if layers:
                groups.append(layers)
    return groups


def _reads_and_writes(layers: list[tuple[str, nn.Module]], width: int) -> bool:
    features = [_features(m) for _, m in layers]
    return len(layers) > 1 and any(i == width for i, _ in features) and any(o == width for _, o in features)


def _hidden_width(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    return getattr(embedding, "embedding_dim", None)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _features(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a Linear (quantized ones included) or transformers' Conv1D (weight (in, out))."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return re.fullmatch(rf"(?:.*\.)?(?:{'|'.join(patterns)})", name) is not None


def _compact(selected: Sequence[str], candidates: Sequence[str]) -> str | list[str]:
    """``target_modules`` that select exactly ``selected`` among ``candidates``: the shortest name
    suffixes that do, in model order; one full-match regular expression where a suffix needs a layer
    index (every index then written ``\\d+``)."""
    chosen = set(selected)
    suffixes: list[str] = []
    for name in (n for n in candidates if n in chosen):
        parts = name.split(".")
        for size in range(1, len(parts) + 1):
            tail = parts[-size:]
            pattern = r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in tail)
            if all(n in chosen for n in candidates if _matches(n, [pattern])):
                break
        if pattern not in suffixes:
            suffixes.append(pattern)
    if all(re.escape(s.replace(r"\.", ".")) == s for s in suffixes):
        return [s.replace(r"\.", ".") for s in suffixes]
    return rf"(?:.*\.)?(?:{'|'.join(suffixes)})"
