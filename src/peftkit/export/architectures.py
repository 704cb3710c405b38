"""The model architectures peftkit exports to GGUF, as llama.cpp's converter (convert_hf_to_gguf.py)
writes them.

Each :class:`Architecture` row says which transformers classes it covers, the GGUF architecture, what
llama.cpp expects of the tensors (Llama's q/k row permutation for its RoPE layout, Gemma's norms stored
as ``1 + w``, whether the output head may be written) and which hyper-parameters go into the file.
Anything else is refused by :func:`architecture_of` in one line naming the supported list.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import torch
from torch import Tensor

from peftkit.foundation.errors import UsageError

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "architecture_of",
    "permute_rows",
    "rope_parameters",
]


@dataclass(frozen=True)
class Architecture:
    """One supported family.

    Attributes:
        name: how the family is named to users ("Llama", "Gemma 2" …).
        hf_classes: the transformers ``architectures`` entries it covers.
        gguf_arch: llama.cpp's architecture.
        write_hparams: ``(config, writer) -> None``, the family's own keys (after the common ones).
        permute_qk: Llama's converter reorders q/k rows from Hugging Face's rotate-half RoPE layout to
            llama.cpp's interleaved one (:func:`permute_rows`); weights, biases and LoRA B alike.
        norm_shift: added to every ``*norm.weight`` (Gemma's RMSNorm multiplies by ``1 + w``).
        head_written: whether an untied output head may be written (Gemma's llama.cpp graphs always
            reuse the token embedding, so an untied head cannot be expressed there).
    """

    name: str
    hf_classes: tuple[str, ...]
    gguf_arch: gguf.MODEL_ARCH
    write_hparams: Callable[[Any, gguf.GGUFWriter], None]
    permute_qk: bool = False
    norm_shift: float = 0.0
    head_written: bool = True

    @property
    def arch_name(self) -> str:
        """The ``general.architecture`` string (``"llama"``, ``"gemma2"`` …)."""
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def tensor_names(self, block_count: int) -> gguf.TensorNameMap:
        """gguf's map from Hugging Face tensor names to llama.cpp's for this architecture."""
        return gguf.get_tensor_name_map(self.gguf_arch, block_count)


def permute_rows(weight: Tensor, n_head: int) -> Tensor:
    """Llama's RoPE row permutation: within each head, rows ``[0..d/2)`` and ``[d/2..d)`` interleave.

    Hugging Face rotates the two halves of a head (rotate-half); llama.cpp rotates adjacent pairs. Row
    ``h·d + 2i + j`` of the result is row ``h·d + j·d/2 + i`` of ``weight`` (j ∈ {0, 1}).

    Args:
        weight: ``(n_head·d, ...)``: a q/k projection weight, its bias, or a LoRA B ``(n_head·d, r)``.
        n_head: heads in that projection (key/value heads for k).

    Returns:
        The permuted tensor, same shape.
    """
    head_dim = weight.shape[0] // n_head
    return weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's RoPE settings for full-attention layers as one dict (transformers 4 and 5 spellings).

    ``rope_theta`` is filled in from the config itself where the dict lacks it.
    """
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if isinstance(params.get("full_attention"), dict):
        params = dict(params["full_attention"])
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    return params


def _sliding_rope_theta(config: Any) -> float | None:
    params = getattr(config, "rope_parameters", None) or {}
    sliding = params.get("sliding_attention") if isinstance(params, dict) else None
    if isinstance(sliding, dict) and "rope_theta" in sliding:
        return float(sliding["rope_theta"])
    return getattr(config, "rope_local_base_freq", None)


def head_dim(config: Any) -> int:
    """Width of one attention head: ``config.head_dim`` where set, else ``hidden / heads``."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_common_hparams(config: Any, writer: gguf.GGUFWriter) -> None:
    """What every supported family shares (TextModel.set_gguf_parameters in llama.cpp's converter)."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    rope = rope_parameters(config)
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    _write_rope_scaling(rope, writer)


def _write_rope_scaling(rope: dict[str, Any], writer: gguf.GGUFWriter) -> None:
    kind = (rope.get("rope_type") or "default").lower()
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3", "longrope", "su"):
        raise UsageError(
            f"RoPE scaling {kind!r} is not exported to GGUF (supported: none, linear, yarn, llama3, longrope)"
        )


def _llama_hparams(config: Any, writer: gguf.GGUFWriter) -> None:
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))


def llama3_rope_factors(config: Any) -> Tensor | None:
    """``rope_freqs.weight`` for Llama 3.1+'s "llama3" RoPE scaling, (head_dim / 2,) float32; None otherwise.

    Per frequency: 1 above the high-frequency wavelength, ``factor`` below the low one, and a smooth
    blend between (Meta's reference, as llama.cpp's converter computes it).
    """
    rope = rope_parameters(config)
    if (rope.get("rope_type") or "").lower() != "llama3":
        return None
    base, dim = float(rope.get("rope_theta", 10000.0)), head_dim(config)
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for freq in 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)):
        wavelength = 2 * math.pi / float(freq)
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def phi3_rope_factors(config: Any) -> tuple[Tensor, Tensor] | None:
    """Phi-3's long-context ``(rope_factors_long, rope_factors_short)``, or None without longrope."""
    rope = rope_parameters(config)
    if not rope.get("long_factor"):
        return None
    return (
        torch.tensor(rope["long_factor"], dtype=torch.float32),
        torch.tensor(rope["short_factor"], dtype=torch.float32),
    )


def _qwen_hparams(config: Any, writer: gguf.GGUFWriter) -> None:
    """Qwen2 and Qwen3 use the common keys only."""


def _gemma_attention_check(config: Any, name: str, pattern: Callable[[int], bool], big_layers: int) -> None:
    """llama.cpp fixes Gemma's attention scale and sliding layers; refuse a config it would misread."""
    scalar = getattr(config, "query_pre_attn_scalar", None)
    allowed = {head_dim(config)}
    if config.num_hidden_layers == big_layers:  # the 27B models scale by hidden / heads
        allowed.add(config.hidden_size // config.num_attention_heads)
    if scalar is not None and scalar not in allowed:
        raise UsageError(
            f"{name}: query_pre_attn_scalar={scalar} is not what llama.cpp uses for this model "
            f"({sorted(allowed)}); it cannot be exported faithfully"
        )
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        expected = ["sliding_attention" if pattern(i) else "full_attention" for i in range(len(layer_types))]
        if list(layer_types) != expected:
            raise UsageError(
                f"{name}: layer_types {list(layer_types)} differ from llama.cpp's fixed pattern {expected}"
            )


def _gemma2_hparams(config: Any, writer: gguf.GGUFWriter) -> None:
    _gemma_attention_check(config, "Gemma 2", lambda i: i % 2 == 0, big_layers=46)
    writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    writer.add_sliding_window(config.sliding_window)


def _gemma3_hparams(config: Any, writer: gguf.GGUFWriter) -> None:
    _gemma_attention_check(config, "Gemma 3", lambda i: (i + 1) % 6 != 0, big_layers=62)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise UsageError("Gemma 3: attn_logit_softcapping is set; llama.cpp's Gemma 3 has none")
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    writer.add_sliding_window(config.sliding_window)
    if (theta := _sliding_rope_theta(config)) is not None:
        writer.add_rope_freq_base_swa(theta)


def _phi3_hparams(config: Any, writer: gguf.GGUFWriter) -> None:
    rope = rope_parameters(config)
    rotary = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0))
    original = rope.get("original_max_position_embeddings") or config.original_max_position_embeddings
    writer.add_rope_scaling_orig_ctx_len(int(original))
    writer.add_rope_dimension_count(int(rotary * config.hidden_size) // config.num_attention_heads)
    writer.add_sliding_window(config.sliding_window or 0)
    if rope.get("long_factor"):
        scale = config.max_position_embeddings / int(original)
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(int(original))) if scale > 1 else 1.0
        writer.add_rope_scaling_attn_factors(attn_factor)


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "Llama",
        ("LlamaForCausalLM", "MistralForCausalLM"),
        gguf.MODEL_ARCH.LLAMA,
        _llama_hparams,
        permute_qk=True,
    ),
    Architecture("Qwen2", ("Qwen2ForCausalLM",), gguf.MODEL_ARCH.QWEN2, _qwen_hparams),
    Architecture("Qwen3", ("Qwen3ForCausalLM",), gguf.MODEL_ARCH.QWEN3, _qwen_hparams),
    Architecture(
        "Gemma 2",
        ("Gemma2ForCausalLM",),
        gguf.MODEL_ARCH.GEMMA2,
        _gemma2_hparams,
        norm_shift=1.0,
        head_written=False,
    ),
    Architecture(
        "Gemma 3",
        ("Gemma3ForCausalLM",),
        gguf.MODEL_ARCH.GEMMA3,
        _gemma3_hparams,
        norm_shift=1.0,
        head_written=False,
    ),
    Architecture("Phi-3", ("Phi3ForCausalLM",), gguf.MODEL_ARCH.PHI3, _phi3_hparams),
)
SUPPORTED = "Llama (SmolLM2, Llama 2/3, Mistral), Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3"


def architecture_of(config: Any) -> Architecture:
    """The row for a transformers config (its ``architectures``, else the class name of its model type).

    Raises:
        UsageError: any other architecture, naming the supported list.
    """
    names = list(getattr(config, "architectures", None) or [])
    for row in ARCHITECTURES:
        if any(name in row.hf_classes for name in names):
            return row
    what = names[0] if names else getattr(config, "model_type", "unknown")
    raise UsageError(f"architecture {what} is not exported to GGUF; supported: {SUPPORTED}")
