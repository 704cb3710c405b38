"""A decoder's shape as the estimate needs it (:class:`Architecture`), read from its config and a model
built on the meta device; and :func:`load_model_config`, the config of whatever the user names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.foundation.modules import is_conv1d

_OUTPUT_PROJECTIONS = {
    "o_proj",
    "out_proj",
    "dense",
    "c_proj",
    "wo",
    "down_proj",
    "fc2",
    "w2",
    "dense_4h_to_h",
}
_ATTENTION_PARENTS = ("attn", "attention")
_MLP_PARENTS = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class Architecture:
    """A decoder's shape, read from its config and its first decoder layer."""

    layers_path: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated: bool
    rms_norm: bool
    attn_in: tuple[str, ...]
    attn_out: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    embedding: str
    lm_head: str | None


def load_model_config(model_or_config: Any) -> Any:
    """The transformers config of a config, model, local directory, Hub id or the bundled default.

    Raises:
        ValueError: no config can be found (the message says what to pass).
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config
    if isinstance(model_or_config, nn.Module):
        config = getattr(model_or_config, "config", None)
        if not isinstance(config, PretrainedConfig):
            raise ValueError(
                f"{type(model_or_config).__name__} has no transformers config; pass the model's "
                "PretrainedConfig, a directory with config.json, or a Hub id"
            )
        return config
    if isinstance(model_or_config, str):
        from peftkit.foundation.loading import DEFAULT_MODEL, default_model_dir

        source = str(default_model_dir()) if model_or_config == DEFAULT_MODEL else model_or_config
        try:
            return AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as error:
            reason = " ".join(str(error).split())  # transformers' messages span lines; errors here are one
            raise ValueError(
                f"no config.json for {model_or_config!r}: give a local model directory, a cached Hub id, "
                f"or {DEFAULT_MODEL!r} ({reason})"
            ) from error
    raise ValueError(
        f"cannot estimate {type(model_or_config).__name__}; pass a config, model, path or Hub id"
    )


def config_name(config: Any) -> str:
    """The name a config was loaded under, else its model type."""
    return str(getattr(config, "_name_or_path", "") or config.model_type)


def meta_model(config: Any) -> nn.Module:
    """The model built on the meta device: shapes only, no memory, no initialisation cost."""
    from transformers import AutoModelForCausalLM

    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{config.model_type} is an encoder-decoder model; estimate models decoder-only LMs")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return name, module
    raise ValueError(f"found no list of {num_layers} decoder layers in {type(model).__name__}")


def _linear_features(module: nn.Module) -> tuple[int, int]:
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def analyse(model: nn.Module, config: Any) -> Architecture:
    """The decoder's shape from its config and the linear layers of its first decoder layer.

    Raises:
        ValueError: a config without the decoder fields, or linear layers not recognised as attention
            or MLP input and output projections.
    """
    missing = [
        f
        for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if not hasattr(config, f)
    ]
    if missing:
        raise ValueError(
            f"the {config.model_type} config lacks {missing}; estimate needs a decoder LM config"
        )
    layers_path, layers = _decoder_layers(model, config.num_hidden_layers)
    groups, features = _projections(layers[0], config.model_type)
    intermediate = features[groups["mlp_out"][0]][0]
    first_in = groups["mlp_in"][0]
    gated = len(groups["mlp_in"]) >= 2 or features[first_in][1] == 2 * intermediate
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    names = {id(module): name for name, module in model.named_modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return Architecture(
        layers_path=layers_path,
        num_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=intermediate,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        gated=gated,
        rms_norm=any("RMSNorm" in type(m).__name__ for m in layers[0].modules()),
        attn_in=tuple(groups["attn_in"]),
        attn_out=groups["attn_out"][0],
        mlp_in=tuple(groups["mlp_in"]),
        mlp_out=groups["mlp_out"][0],
        embedding=names[id(model.get_input_embeddings())],
        lm_head=names.get(id(head)) if head is not None else None,
    )


def _projections(
    layer: nn.Module, model_type: str
) -> tuple[dict[str, list[str]], dict[str, tuple[int, int]]]:
    """A decoder layer's linear layers grouped as ``attn_in``, ``attn_out``, ``mlp_in`` and ``mlp_out``
    (by their parents' and their own names), and each one's ``(in, out)`` features."""
    groups: dict[str, list[str]] = {"attn_in": [], "attn_out": [], "mlp_in": [], "mlp_out": []}
    features: dict[str, tuple[int, int]] = {}
    for name, module in layer.named_modules():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            continue
        parent, _, leaf = name.rpartition(".")
        part = "attn" if any(p in parent for p in _ATTENTION_PARENTS) else None
        part = part or ("mlp" if any(p in parent for p in _MLP_PARENTS) else None)
        if part is None:
            raise ValueError(f"{model_type}: cannot tell whether {name!r} is attention or MLP")
        groups[f"{part}_{'out' if leaf in _OUTPUT_PROJECTIONS else 'in'}"].append(name)
        features[name] = _linear_features(module)
    if (
        len(groups["attn_out"]) != 1
        or len(groups["mlp_out"]) != 1
        or not groups["attn_in"]
        or not groups["mlp_in"]
    ):
        raise ValueError(
            f"{model_type}: expected attention input projections, one output projection, MLP input "
            f"projections and one down projection per layer; found {groups}"
        )
    return groups, features
