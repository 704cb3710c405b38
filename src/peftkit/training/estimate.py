"""The memory of a ``peftkit train`` run, predicted from its settings and its data (``--estimate-only``).

The run's batch is its worst micro-batch: ``batch_size`` packed rows as long as the longest packed row,
laid end to end with no padding and no mask, where the run packs; else ``batch_size`` rows as long as
the longest tokenized training row, padded (with an attention mask). A preference objective's batch is
``batch_size`` pairs of two sequences (the prompt and an answer) as long as the longest pair's, padded.
Its loss is the one ``peftkit train`` computes (the fused head + cross-entropy unless switched off),
and its targets, rank, dropout, dtype and checkpointing are the run's. Only the tokenizer, the data and
the model's config are read; the weights are not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit.foundation.errors import UsageError
from peftkit.training.method_choice import build_method_config
from peftkit.training.train_config import TrainConfig

if TYPE_CHECKING:
    from peftkit.memory import MemoryEstimate

__all__ = ["estimate_run", "run_rows"]


def estimate_run(config: TrainConfig) -> tuple[MemoryEstimate, list[str]]:
    """The predicted memory of ``config``'s run, with notes on what was assumed.

    Returns:
        ``(estimate, notes)``: full fine-tuning next to the run's LoRA (for method ``full`` the LoRA
        column is ``peftkit train``'s default LoRA, to compare).

    Raises:
        UsageError: a method other than ``lora`` and ``full`` (DoRA included), a task other than
            ``causal-lm``, or a model whose config cannot be read or is not a decoder LM.
    """
    from peftkit.foundation.loading import load_tokenizer
    from peftkit.memory import estimate
    from peftkit.methods.lora import LoraConfig
    from peftkit.ops import fused_cross_entropy_enabled

    refusal = "--estimate-only models full fine-tuning and LoRA only"
    if config.task != "causal-lm":
        raise UsageError(f"{refusal}, on decoder language models: task {config.task!r} is not modelled")
    if config.method == "full":
        lora = build_method_config("lora", {}, config.task)
        notes = ["this run: full fine-tuning (the LoRA column is peftkit train's default LoRA, to compare)"]
    else:
        lora = build_method_config(config.method, config.method_options, config.task)
        notes = ["this run: the LoRA column (full fine-tuning shown to compare)"]
    if type(lora) is not LoraConfig or lora.use_dora:
        raise UsageError(
            f"{refusal}: method {config.method!r} is not modelled; use --method lora or --method full"
        )
    seq, packed = _row_length(config, load_tokenizer(config.model), lora, notes)
    if config.bf16:
        notes.append("bf16 autocast is not modelled: the estimate assumes arithmetic in the weights' dtype")
    try:
        result = estimate(
            config.model,
            method=lora,
            batch=config.batch_size,
            seq=seq,
            dtype=config.dtype,
            grad_checkpointing=config.gradient_checkpointing,
            loss="fused" if fused_cross_entropy_enabled() else "model",
            padded=not packed,  # padded batches have an attention mask; packed ones none
            quantize=None if config.quantize == "none" else config.quantize,
            double_quant=config.quantize_options.get(
                "double_quant", config.quantize_options.get("bnb_4bit_use_double_quant", True)
            ),
            objective=config.objective,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    return result, notes


def _row_length(
    config: TrainConfig, tokenizer: object | None, method_config: object, notes: list[str]
) -> tuple[int, bool]:
    """The tokens of the run's longest row (``max_length`` without a tokenizer) and whether its rows are
    packed, said in ``notes``."""
    if tokenizer is None:
        # rows all max_length long: unset, packing would not pay
        packed = bool(config.packing or config.padding_free) and config.objective == "sft"
        notes.append(
            f"no tokenizer for {config.model}: rows assumed max_length={config.max_length} tokens long"
            + (", packed (no padding, no mask)" if packed else ", padded")
        )
        return config.max_length, packed
    if config.objective != "sft":
        seq = longest_pair(config, tokenizer)
        notes.append(
            f"batch: {config.batch_size} pairs, each a chosen and a rejected sequence of up to {seq} tokens "
            "(the longest pair's prompt and longer answer)"
        )
        return seq, False
    lengths, packed = run_rows(config, tokenizer, method_config)
    seq = max(lengths)
    if packed and config.padding_free:
        note = f"batch: at most {config.batch_size} x {seq} tokens (the longest example), end to end"
    elif packed:
        note = (
            f"batch: {config.batch_size} packed rows of {seq} tokens (the longest packed row), one "
            "sequence with no padding"
        )
    else:
        note = f"batch: {config.batch_size} rows of {seq} tokens (the longest training row), padded"
    notes.append(note)
    return seq, packed


def longest_pair(config: TrainConfig, tokenizer: object) -> int:
    """Tokens in the longest preference pair of ``config``'s data as ``peftkit train`` prepares it: the
    longest prompt plus its longer answer."""
    from peftkit.training.data import prepare_data

    data = prepare_data(config, tokenizer)
    columns = zip(data.train["prompt_ids"], data.train["chosen_ids"], data.train["rejected_ids"], strict=True)
    return max(len(p) + max(len(c), len(r)) for p, c, r in columns)


def run_rows(config: TrainConfig, tokenizer: object, method_config: object) -> tuple[list[int], bool]:
    """The tokens of each training row of ``config``'s run, as ``peftkit train`` prepares (and packs)
    them, and whether they are packed; the model is built on the meta device to see if it packs."""
    from peftkit.memory.architecture import load_model_config, meta_model
    from peftkit.training.data import pack_training_rows, packing_blocker, prepare_data

    try:
        model = meta_model(load_model_config(config.model))
    except ValueError as e:
        raise UsageError(str(e)) from e
    data = prepare_data(config, tokenizer)
    data = pack_training_rows(data, config, packing_blocker(config, model, method_config))
    return data.lengths, data.packed
