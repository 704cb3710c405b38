"""Would vLLM serve this adapter directory? The checks of vLLM's ``PEFTHelper.validate_legal`` and its
rank limit, read from the files alone (standard library only: no torch, no vLLM).

vLLM's ``--max-lora-rank`` takes one of :data:`VLLM_MAX_LORA_RANKS` (default 16) and refuses adapters
whose rank (``r`` and any ``rank_pattern`` value) is above it; DoRA, LoRA bias, ``modules_to_save``
(except a classifier head), initialisations that change the base weights (PiSSA, OLoRA…), layer
replication and QALoRA are refused. Adapters on embedding layers are refused here too.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

__all__ = [
    "VLLM_MAX_LORA_RANKS",
    "adapter_report",
    "required_max_lora_rank",
    "safetensors_names",
    "vllm_command",
    "vllm_problems",
]

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py, MaxLoRARanks
_WEIGHT_ONLY_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # vLLM loads these as plain LoRA


def safetensors_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file, read from its header (the weights are not read)."""
    with path.open("rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(size))
    return [name for name in header if name != "__metadata__"]


def vllm_problems(config: dict[str, Any], tensor_names: list[str]) -> list[str]:
    """Why vLLM would refuse the adapter with this ``adapter_config.json`` and these tensor names.

    Returns:
        One sentence per reason; empty when vLLM would load it (given a ``--max-lora-rank`` at least
        :func:`required_max_lora_rank`).
    """
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"vLLM serves LoRA adapters only; this is {config.get('peft_type')}")
        return problems
    rank = max([int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"rank {rank} is above vLLM's largest --max-lora-rank, {VLLM_MAX_LORA_RANKS[-1]}")
    saved = [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if saved:
        problems.append(
            f"modules_to_save {saved}: vLLM loads no full module copies (a classifier head aside)"
        )
    if config.get("use_dora"):
        problems.append("DoRA (use_dora): vLLM does not support it; merge it into the base instead")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append(f"trained biases (bias={config.get('bias')!r}): vLLM does not load adapter biases")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _WEIGHT_ONLY_INITS:
        problems.append(
            f"init_lora_weights={init!r} changes the base weights when loaded; vLLM does not support it "
            "(convert it to plain LoRA first)"
        )
    if config.get("layer_replication"):
        problems.append("layer_replication: vLLM does not support it")
    if config.get("use_qalora"):
        problems.append("QALoRA (use_qalora): vLLM does not support it")
    embedding = sorted({n.split(".lora_embedding_")[0] for n in tensor_names if ".lora_embedding_" in n})
    if embedding:
        problems.append(f"LoRA on embedding layers ({', '.join(embedding[:3])}): vLLM does not load it")
    return problems


def required_max_lora_rank(config: dict[str, Any]) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that covers this adapter's rank."""
    rank = max([int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    return next((allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank), VLLM_MAX_LORA_RANKS[-1])


def vllm_command(config: dict[str, Any], name: str, directory: str) -> str:
    """The ``vllm serve`` command that serves this adapter as ``name``."""
    base = config.get("base_model_name_or_path") or "BASE_MODEL"
    command = f"vllm serve {base} --enable-lora --lora-modules {name}={directory}"
    rank = required_max_lora_rank(config)
    return command + (f" --max-lora-rank {rank}" if rank > 16 else "")


def adapter_report(directory: Path) -> str:
    """What ``peftkit inspect ADAPTER_DIR`` prints: the adapter's settings and vLLM's verdict, with why.

    Raises:
        ValueError: no readable ``adapter_config.json`` or no ``adapter_model.safetensors``.
    """
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{directory}/adapter_config.json cannot be read: {e}") from e
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{directory} has no adapter_model.safetensors")
    names = safetensors_names(weights)
    targets = config.get("target_modules")
    targets = [targets] if isinstance(targets, str) else sorted(targets or [])
    lines = [
        f"adapter: {directory}",
        f"  method {config.get('peft_type')}, rank {config.get('r')}, lora_alpha {config.get('lora_alpha')}",
        f"  targets: {', '.join(targets) or 'none'}",
        f"  base model: {config.get('base_model_name_or_path') or 'not recorded'}",
        f"  tensors: {len(names)} in {weights.name}",
    ]
    problems = vllm_problems(config, names)
    if problems:
        lines.append("vLLM: would refuse it:")
        lines += [f"  - {problem}" for problem in problems]
    else:
        lines.append(f"vLLM: would load it (rank {required_max_lora_rank(config)} fits --max-lora-rank):")
        lines.append(f"  {vllm_command(config, directory.name or 'adapter', str(directory))}")
    return "\n".join(lines)
