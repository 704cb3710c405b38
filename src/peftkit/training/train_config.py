"""``TrainConfig``: every setting of ``peftkit train``, from one YAML file and/or command-line flags.

Each key of :class:`TrainConfig` is a YAML key and a flag (``max_steps:`` ↔ ``--max-steps``). The
options of the chosen method's config class (``r``, ``lora_alpha``, ``target_modules`` … for LoRA) go
under ``method_options:`` in YAML and are flags too (``--r 16``). A key that is neither is an error that
suggests the closest known key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftkit.foundation.errors import UsageError, closest
from peftkit.foundation.loading import DEFAULT_MODEL
from peftkit.foundation.quantization import check_quantization_options
from peftkit.foundation.tasks import TASKS
from peftkit.objectives.choice import OBJECTIVE_OPTIONS, OBJECTIVES, OPTION_HELP, OPTION_NAMES
from peftkit.training.method_choice import METHOD_NAMES, method_fields, unknown_name
from peftkit.training.objective_settings import check_objective

__all__ = [
    "LR_SCHEDULERS",
    "METRICS",
    "OPTIMIZERS",
    "TrainConfig",
    "apply_overrides",
    "closest",
    "load_config",
    "parse_value",
    "read_yaml_mapping",
    "with_task_defaults",
]

METRICS = ("auto", "exact_match", "rouge1", "rouge2", "rougeL", "accuracy", "loss", "preference_accuracy")
PREFERENCE_TASK = "person-json-pairs"  # the bundled data of a preference objective given no data
DTYPES = ("float32", "bfloat16")
QUANTIZE = ("none", "nf4", "fp4", "int8")  # bitsandbytes schemes (peftkit.foundation.quantization.SCHEMES)
DATA_FORMATS = ("auto", "prompt_completion", "instruction", "messages")
OPTIMIZERS = ("adamw", "lora-plus")  # built by peftkit.training.optimization
LR_SCHEDULERS = ("cosine", "linear", "constant")
LORAPLUS_LR_RATIO = 16.0  # the LoRA+ paper's usual ratio, and Hugging Face PEFT's example


def _key(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with an immutable default and its help text (shown by ``--help``)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Settings of one training run. Defaults give the default job (LoRA on the bundled task)."""

    # --- model and method
    model: str = _key(
        DEFAULT_MODEL, "base model: Hugging Face id, local directory, .gguf file, or the bundled default"
    )
    task: str = _key("causal-lm", "model head", choices=tuple(TASKS))
    dtype: str = _key("float32", "dtype of the base weights", choices=DTYPES)
    quantize: str = _key(
        "none", "load the base's linear layers quantized (QLoRA; bitsandbytes)", choices=QUANTIZE
    )
    quantize_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "with quantize: BitsAndBytesConfig settings, e.g. {compute_dtype: float32, "
            "double_quant: false, llm_int8_threshold: 6.0, llm_int8_skip_modules: [lm_head]}"
        },
    )
    method: str = _key("lora", ", ".join(METHOD_NAMES))
    method_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "options of the method's config class, e.g. {r: 8}"}
    )
    # --- objective
    objective: str = _key(
        "sft",
        "what training minimises: sft (the answers' cross-entropy), or a preference loss on pairs of a "
        f"chosen and a rejected answer: dpo, orpo, simpo (default data: {PREFERENCE_TASK})",
        choices=OBJECTIVES,
    )
    beta: float | None = _key(None, OPTION_HELP["beta"])
    simpo_gamma: float | None = _key(None, OPTION_HELP["simpo_gamma"])
    cpo_alpha: float | None = _key(None, OPTION_HELP["cpo_alpha"])
    rpo_alpha: float | None = _key(None, OPTION_HELP["rpo_alpha"])
    reference: str | None = _key(None, OPTION_HELP["reference"])
    # --- data
    data: str = _key("person-json", "training file (.jsonl/.json/.csv/.parquet) or a bundled task name")
    validation_data: str | None = _key(None, "held-out file; default: split off validation_split of data")
    validation_split: float = _key(0.1, "fraction of data held out when validation_data is unset")
    validation_rows: int = _key(0, "use only the first N held-out rows (a fixed subset); 0: all")
    data_format: str = _key("auto", "row layout", choices=DATA_FORMATS)
    prompt_column: str = _key("prompt", "prompt_completion: the prompt column")
    completion_column: str = _key("completion", "prompt_completion: the answer column")
    labels: list[str] | None = field(
        default=None,
        metadata={
            "help": "seq-cls: the class names in id order (the model's id2label); default: the training "
            "rows' labels, numbers in numeric order, then names A-Z. Recorded in train_config.yaml"
        },
    )
    instruction_column: str = _key("instruction", "instruction format: the instruction column")
    input_column: str = _key("input", "instruction format: the (optional) input column")
    output_column: str = _key("output", "instruction format: the answer column")
    messages_column: str = _key("messages", "messages format: the column of chat turns")
    chosen_column: str = _key("chosen", "preference objectives: the preferred answer's column")
    rejected_column: str = _key("rejected", "preference objectives: the other answer's column")
    prompt_template: str | None = _key(
        None, "Python format string over a row's columns, e.g. 'Summarize:\\n{dialogue}'"
    )
    system_prompt: str | None = _key(None, "system message added to every chat")
    reference_columns: list[str] | None = field(
        default=None, metadata={"help": "extra reference answers for ROUGE, e.g. [summary2, summary3]"}
    )
    max_length: int = _key(512, "longest tokenized example; longer ones are truncated (counted)")
    packing: bool | None = _key(
        None,
        "causal-lm: pack whole examples into rows of up to max_length tokens, each attending only to "
        "itself (batch_size then counts packed rows); unset: on where it applies and padded batches "
        "would be under 90 percent full; --no-packing: one example per row, padded (or padding-free)",
    )
    padding_free: bool = _key(
        False,
        "causal-lm, instead of packing (whatever packing says): each batch's batch_size examples laid end "
        "to end with no padding, each attending only to itself (the batches and loss of padded rows)",
    )
    # --- optimisation
    max_steps: int = _key(60, "optimizer steps; 0: run `epochs` epochs")
    epochs: float = _key(1.0, "epochs when max_steps is 0")
    batch_size: int = _key(8, "examples per device per micro-batch")
    grad_accum: int = _key(1, "micro-batches per optimizer step")
    lr: float = _key(2e-3, "peak learning rate (with lora-plus: of every parameter but LoRA's B factors)")
    optimizer: str = _key(
        "adamw",
        "adamw; lora-plus: AdamW with LoRA's B factors at lr x loraplus_lr_ratio (LoRA+, LoRA methods)",
        choices=OPTIMIZERS,
    )
    loraplus_lr_ratio: float = _key(
        LORAPLUS_LR_RATIO, "with optimizer lora-plus: the B factors' learning rate over lr (at least 1)"
    )
    weight_decay: float = _key(0.0, "AdamW weight decay (matrices only)")
    lr_scheduler: str = _key(
        "cosine",
        "after the warm-up: cosine or linear decay to 0 at the last step, or constant",
        choices=LR_SCHEDULERS,
    )
    warmup_steps: int = _key(6, "linear warm-up steps, then lr_scheduler")
    max_grad_norm: float = _key(1.0, "gradient clipping norm; 0: off")
    seed: int = _key(0, "seed for initialisation, data order and dropout")
    threads: int = _key(0, "CPU threads per process; 0: the cores other processes leave free (rechecked)")
    bf16: bool = _key(False, "bfloat16 autocast (mixed precision)")
    gradient_checkpointing: bool = _key(False, "recompute activations in backward to save memory")
    fsdp: bool = _key(
        False, "under torchrun: shard parameters across the processes with FSDP2 instead of replicating (DDP)"
    )
    # --- evaluation
    metric: str = _key(
        "auto", "headline metric; auto: exact_match for short answers, rougeL for long", choices=METRICS
    )
    eval_every: int = _key(0, "evaluate every N steps (always before and after); 0: only before and after")
    eval_examples: int = _key(50, "held-out rows scored by generation (loss uses all of them)")
    max_new_tokens: int = _key(0, "generation length for scoring; 0: longest reference + 8")
    # --- output
    output_dir: str = _key("out/train", "where the adapter, metrics, plots and checkpoints go")
    save_every: int = _key(
        0,
        "checkpoint every N steps and at the last (for --resume); 0: none, but Ctrl-C still writes one "
        "(the adapter itself is saved at the end either way)",
    )
    keep_checkpoints: int = _key(2, "how many recent checkpoints to keep")
    log_every: int = _key(1, "log the training loss every N steps")
    overwrite: bool = _key(False, "replace an existing output_dir")
    resume: bool = _key(False, "continue from the last checkpoint in output_dir")
    estimate_only: bool = _key(
        False,
        "print the predicted memory of this run (full fine-tuning vs the method) and exit; nothing is "
        "loaded or trained. Models full fine-tuning and LoRA (with method full, the LoRA column is the "
        "default LoRA, for comparison); batch_size rows of max_length tokens",
    )

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML-ready data."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated)."""
        return apply_overrides(self, changes, source="replace()")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def parse_value(text: str) -> Any:
    """A flag's text as YAML (``16`` → 16, ``true`` → True, ``[q, v]`` → list); commas make a list."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and "," in value and "{" not in value and " " not in value.strip():
        return [part for part in value.split(",") if part]
    return value if value is not None or text.strip().lower() in ("null", "none", "~") else text


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read a YAML file (or start from the defaults when ``path`` is None) and apply ``overrides``.

    Raises:
        UsageError: a missing or malformed file, an unknown key (with the closest known one), or a bad
            value.
    """
    config = TrainConfig()
    if path is not None:
        config = apply_overrides(config, read_yaml_mapping(path, "config file"), source=str(path))
    return with_task_defaults(apply_overrides(config, overrides or {}, source="the command line"))


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds (empty for an empty file).

    Raises:
        UsageError: the file is missing, is not YAML, or holds something other than a mapping; the
            message calls it ``what`` ("config file", "compare file").
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def with_task_defaults(config: TrainConfig) -> TrainConfig:
    """Apply a bundled task's settings (``peftkit.training.tasks``) to the keys still at their defaults.

    A preference objective given the default data trains on the bundled preference task instead. A
    task's objective option (``rpo_alpha``…) applies only to the objectives that take it.
    """
    from peftkit.training.tasks import builtin_task

    if config.objective != "sft" and config.data == FIELDS["data"].default:
        config = dataclasses.replace(config, data=PREFERENCE_TASK)
    task = builtin_task(config.data)
    if task is None:
        return config
    taken = OBJECTIVE_OPTIONS[config.objective]
    changes = {
        key: value
        for key, value in task.settings.items()
        if getattr(config, key) == FIELDS[key].default and (key not in OPTION_NAMES or key in taken)
    }
    return dataclasses.replace(config, **changes)


def apply_overrides(config: TrainConfig, changes: Mapping[str, Any], source: str) -> TrainConfig:
    """A copy of ``config`` with ``changes``; ``method_options`` dicts are merged key by key.

    Raises:
        UsageError: an unknown key or a bad value, naming ``source``.
    """
    values = config.to_dict()
    method = str(changes.get("method", config.method))
    for key, value in changes.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            if name in method_fields(method):  # a method option written flat, as flags are
                values["method_options"] = {**values["method_options"], name: value}
                continue
            raise unknown_name(name, method, FIELDS, f"in {source}")
        value = _coerce(name, value, source)
        if name == "method_options":
            value = {**values["method_options"], **value}
        values[name] = value
    result = TrainConfig(**values)
    _validate(result, source)
    return result


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = str(FIELDS[name].type)
    optional = "None" in kind
    if value is None:
        if optional:
            return None
        raise UsageError(f"{name} in {source} cannot be empty")
    bad = UsageError(f"{name}={value!r} in {source} must be {kind.replace(' | None', '')}")
    if kind.startswith("bool"):
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise bad
    elif kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            number = float(value)
        except ValueError:
            raise bad from None
        if number != int(number):
            raise bad
        return int(number)
    elif kind.startswith("float"):
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    elif kind.startswith("str"):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad
        return str(value)
    elif kind.startswith("list"):
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)) or not all(_is_name(v) for v in value):
            raise bad
        return [str(v) for v in value]  # YAML reads `labels: [0, 1]` as numbers
    elif kind.startswith("dict") and not isinstance(value, Mapping):
        raise UsageError(f"{name} in {source} must be a mapping such as {{r: 8}}, not {value!r}")
    return value


def _is_name(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


# (field, test, what it must be): checked after every change
_RULES = (
    ("lr", lambda v: v > 0, "a positive number, e.g. 2e-4"),
    ("batch_size", lambda v: v >= 1, "at least 1"),
    ("grad_accum", lambda v: v >= 1, "at least 1"),
    ("max_steps", lambda v: v >= 0, "0 (use epochs) or more"),
    ("epochs", lambda v: v > 0, "positive"),
    ("warmup_steps", lambda v: v >= 0, "0 or more"),
    ("weight_decay", lambda v: v >= 0, "0 or more"),
    ("loraplus_lr_ratio", lambda v: v >= 1, "at least 1 (B learns faster than A), e.g. 16"),
    ("max_grad_norm", lambda v: v >= 0, "0 (no clipping) or more"),
    ("validation_split", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("max_length", lambda v: v >= 8, "at least 8"),
    ("eval_every", lambda v: v >= 0, "0 or more"),
    ("validation_rows", lambda v: v >= 0, "0 (all) or more"),
    ("eval_examples", lambda v: v >= 0, "0 or more"),
    ("max_new_tokens", lambda v: v >= 0, "0 (automatic) or more"),
    ("save_every", lambda v: v >= 0, "0 or more"),
    ("keep_checkpoints", lambda v: v >= 1, "at least 1"),
    ("log_every", lambda v: v >= 1, "at least 1"),
    ("threads", lambda v: v >= 0, "0 (automatic) or more"),
)


def _check_labels(labels: list[str], task: str, source: str) -> None:
    if task != "seq-cls":
        raise UsageError(f"labels (from {source}) name a classifier's classes: add --task seq-cls")
    repeated = sorted({name for name in labels if labels.count(name) > 1})
    if len(labels) < 2 or repeated:
        what = f"names {repeated[0]!r} twice" if repeated else f"has {len(labels)}"
        raise UsageError(f"labels (from {source}) {what}; give two or more distinct class names")


def _validate(config: TrainConfig, source: str) -> None:
    for name, ok, meaning in _RULES:
        value = getattr(config, name)
        if not ok(value):
            raise UsageError(f"{name}={value!r} (from {source}) must be {meaning}")
    for name, f in FIELDS.items():
        choices = f.metadata.get("choices")
        if choices and getattr(config, name) not in choices:
            value = getattr(config, name)
            raise UsageError(
                f"{name}={value!r} (from {source}) must be one of {list(choices)}"
                f"{closest(str(value), choices)}"
            )
    if config.quantize != "none" and config.method in ("full", "selective", "ln-tuning"):
        raise UsageError(
            f"quantize={config.quantize!r} (from {source}) freezes the base's linear weights in "
            f"{config.quantize}; method {config.method!r} trains base weights: use an adapter method "
            "(lora, dora, ia3, ...) or quantize: none"
        )
    if config.quantize_options:
        if config.quantize == "none":
            raise UsageError(
                f"quantize_options (from {source}) apply to a quantized base; set quantize: nf4, fp4 or int8"
            )
        try:
            check_quantization_options(config.quantize_options)
        except UsageError as e:
            raise UsageError(f"{e} (from {source})") from None
    if config.loraplus_lr_ratio != LORAPLUS_LR_RATIO and config.optimizer != "lora-plus":
        raise UsageError(
            f"loraplus_lr_ratio (from {source}) applies to optimizer lora-plus, not {config.optimizer!r}; "
            "add --optimizer lora-plus"
        )
    if config.labels is not None:
        _check_labels(config.labels, config.task, source)
    if config.resume and config.overwrite:
        raise UsageError(
            "resume and overwrite exclude each other: resume keeps output_dir, overwrite replaces it"
        )
    check_objective(config, source)
