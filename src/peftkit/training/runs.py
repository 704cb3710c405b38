"""Opening what ``peftkit train`` wrote (or any adapter / model directory) for eval, generate and merge.

A run directory records its settings in ``train_config.yaml``: the base model, and how prompts were
built (``prompt_template``, ``system_prompt``) and on which data. A directory without that file (an
adapter copied elsewhere, a model from another tool) records none of them, so none are assumed: prompts
are the user's text in the model's chat template, and there is no held-out data.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from peftkit.core.targeting import CLASSIFIER_HEAD_NAMES
from peftkit.foundation.errors import UsageError
from peftkit.foundation.io import CONFIG_NAME, WEIGHTS_NAME
from peftkit.model import load
from peftkit.training.data import encode
from peftkit.training.run_directory import CONFIG_FILE, base_model_config, load_base_model
from peftkit.training.train_config import TrainConfig, load_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "NO_DATA",
    "apply_prompt_template",
    "build_prompt",
    "is_recorded",
    "load_run",
    "run_config",
]

NO_DATA = ""  # ``data`` of a directory that records none
_TASKS_BY_TYPE = {"CAUSAL_LM": "causal-lm", "SEQ_2_SEQ_LM": "seq2seq-lm", "SEQ_CLS": "seq-cls"}
_MODEL_CONFIG = "config.json"  # transformers' file: the directory holds a whole model


def is_recorded(path: str | Path) -> bool:
    """Whether ``path`` records its run's settings (a ``train_config.yaml``)."""
    return (Path(path) / CONFIG_FILE).is_file()


def run_config(path: str | Path, model: str | None = None) -> TrainConfig:
    """The settings a run was trained with: its ``train_config.yaml``, else what the directory tells.

    Without ``train_config.yaml`` the base model and task come from ``adapter_config.json`` (or the
    directory is the model: a classifier when its ``config.json`` names one), nothing else is assumed:
    ``prompt_template`` and ``system_prompt`` are None and ``data`` is :data:`NO_DATA`; the other keys
    keep their defaults.

    Args:
        path: a run directory, an adapter directory, or a full model directory.
        model: use this base model instead of the recorded one.

    Raises:
        UsageError: ``path`` does not exist or holds neither an adapter nor a model.
    """
    path = Path(path)
    if not path.is_dir():
        raise UsageError(
            f"{path} is not a directory; pass the output_dir of peftkit train or an adapter directory"
        )
    overrides: dict[str, Any] = {"output_dir": str(path)}
    if is_recorded(path):
        config = load_config(path / CONFIG_FILE, overrides)
    elif (path / CONFIG_NAME).is_file():
        adapter = json.loads((path / CONFIG_NAME).read_text())
        if adapter.get("base_model_name_or_path"):
            overrides["model"] = adapter["base_model_name_or_path"]
        if adapter.get("task_type") in _TASKS_BY_TYPE:
            overrides["task"] = _TASKS_BY_TYPE[adapter["task_type"]]
        config = load_config(None, {**overrides, "data": NO_DATA})
    elif (path / _MODEL_CONFIG).is_file():
        overrides.update(model=str(path), method="full", data=NO_DATA)
        architectures = json.loads((path / _MODEL_CONFIG).read_text()).get("architectures") or []
        if any(name.endswith("ForSequenceClassification") for name in architectures):
            overrides["task"] = "seq-cls"  # a merged classifier: its head and id2label are in config.json
        config = load_config(None, overrides)
    else:
        raise UsageError(f"{path} holds no {CONFIG_NAME} (adapter) or {_MODEL_CONFIG} (model)")
    return config if model is None else config.replace(model=model)


def load_run(
    path: str | Path, model: str | None = None, adapter: bool = True
) -> tuple[nn.Module, Any, TrainConfig]:
    """Load a run's model: the base model with the run's adapter (``adapter=False``: the base alone).

    A directory holding a whole model (a full fine-tuning run, the output of ``peftkit merge``) loads
    as that model, quantized only if its ``config.json`` says so; ``adapter=False`` then gives the base
    model it started from.

    Returns:
        ``(model, tokenizer, config)``, the model in eval mode, ``config`` from :func:`run_config`.
    """
    path = Path(path)
    config = run_config(path, model)
    has_adapter = (path / CONFIG_NAME).is_file()
    if adapter and not has_adapter and model is None and (path / _MODEL_CONFIG).is_file():
        # The model's own config.json decides how it loads: a merged QLoRA run is a float model although
        # its copied train_config.yaml says `quantize: nf4`; a re-quantized merge records its
        # quantization_config there, which from_pretrained applies by itself.
        config_for_load = config.replace(model=str(path), quantize="none")
    else:
        config_for_load = config
    if adapter and has_adapter and config.task == "seq-cls" and not config.labels:
        config_for_load = _with_saved_head_size(config_for_load, path)
    base, tokenizer = load_base_model(config_for_load)
    if adapter and has_adapter:
        try:
            base = load(base, path)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"cannot load the adapter in {path}: {e}") from e
    return base.eval(), tokenizer, config


def _with_saved_head_size(config: TrainConfig, path: Path) -> TrainConfig:
    """``config`` with as many (transformers' placeholder) labels as the classification head saved with
    the adapter in ``path`` has outputs, where that is not the base's count; a run records its labels,
    an adapter copied alone does not."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as weights:
            heads = [key for key in weights.keys() if _is_head_weight(key)]  # noqa: SIM118 (not a dict)
            shapes = [weights.get_slice(key).get_shape() for key in heads]
    except (SafetensorError, OSError):
        return config  # loading the adapter says what is wrong with the file
    outputs = min((shape[0] for shape in shapes if len(shape) == 2), default=None)
    if outputs is None or outputs == base_model_config(config).num_labels:
        return config
    return config.replace(labels=[f"LABEL_{i}" for i in range(outputs)])


def _is_head_weight(key: str) -> bool:
    """Whether an adapter file's ``key`` is a weight of a saved classification head
    (``base_model.model.classifier.weight``, RoBERTa's ``….classifier.out_proj.weight``…)."""
    parts = key.split(".")
    return len(parts) > 3 and parts[2] in CLASSIFIER_HEAD_NAMES and parts[-1] == "weight"


def build_prompt(
    config: TrainConfig, text: str, tokenizer: PreTrainedTokenizerBase, raw: bool = False
) -> list[int]:
    """The token ids ``peftkit generate`` feeds the model for ``text``: the prompt as the run built it.

    ``text`` goes into the run's ``prompt_template`` (unless ``raw``), the run's ``system_prompt`` comes
    first, and the chat is rendered as training rendered it (the chat template, ending where the
    answer starts; without one, the turns joined by blank lines). ``seq2seq-lm``: the encoder's input.

    Args:
        config: the run's settings, from :func:`run_config` or :func:`load_run`.
        text: the input, e.g. the sentence for person-json.
        raw: leave ``text`` out of the ``prompt_template``.

    Returns:
        ``input_ids`` of one prompt, (prompt_len,), for ``model.generate(torch.tensor([ids]), ...)``.
    """
    content = text if raw else apply_prompt_template(config.prompt_template, text)
    if config.task == "seq2seq-lm":
        return list(tokenizer(content)["input_ids"])
    system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    chat = [*system, {"role": "user", "content": content}, {"role": "assistant", "content": ""}]
    return encode(tokenizer, chat)[2]


def apply_prompt_template(template: str | None, text: str) -> str:
    """Put ``text`` into a run's ``prompt_template`` when the template has exactly one field."""
    if not template:
        return text
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    if len(fields) != 1:
        return text
    return template.format(**{fields.pop(): text})
