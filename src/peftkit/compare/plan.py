"""What ``peftkit compare`` runs: one set of shared settings, a list of methods, an optional rank sweep.

A compare file is a ``peftkit train`` YAML file (model, data, steps, seed… shared by every method) with
three more keys::

    methods: [full, lora, lora-all-linear, adapter, prompt]   # presets, or mappings (below)
    ranks: [2, 8, 32]                                         # LoRA rank sweep (optional)
    general_text: my_text.txt                                 # forgetting probe (default: shipped)

A method is a preset name (:data:`PRESETS`) or a mapping of ``peftkit train`` keys with a ``name``,
optionally starting from a preset: ``{name: lora-qv, preset: lora, target_modules: [q_proj, v_proj]}``.
Objectives compare the same way: ``objective: dpo`` shared (the data: pairs), and a method may set its
own (``{name: lora-orpo, preset: lora, objective: orpo}``) with its options (``beta``…); the base model
is scored under the shared objective. One comparison trains either SFT or preference objectives (their
data differ).
Method options may be written flat (``r: 16``) or under ``method_options``. The sweep trains the first
LoRA method in the list (or ``rank_sweep:``, a preset or mapping) at each rank with ``lora_alpha = 2r``;
a sweep point equal to a listed method is that method, not a second run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.foundation.errors import UsageError
from peftkit.methods import METHOD_TABLE, method_by_name
from peftkit.objectives.choice import OPTION_NAMES
from peftkit.training.method_choice import ALIASES, FULL, method_entry, method_fields
from peftkit.training.train_config import (
    FIELDS,
    TrainConfig,
    apply_overrides,
    closest,
    read_yaml_mapping,
    with_task_defaults,
)

__all__ = [
    "DEFAULT_METHODS",
    "GENERAL_TEXT",
    "PRESETS",
    "ComparePlan",
    "PlannedRun",
    "load_plan",
    "make_plan",
]

GENERAL_TEXT = Path(__file__).resolve().parent / "general_text.txt"
DEFAULT_OUTPUT = "out/compare"
SWEEP_ALPHA_PER_RANK = 2  # lora_alpha = 2r at every sweep point: the scale alpha/r stays the same

# One preset per method of the method table (its defaults and learning rate), plus comparison points.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"method": FULL, "lr": 5e-5},  # ~20x less than LoRA: every weight moves
    **{entry.name: {"method": entry.name, "lr": entry.lr} for entry in METHOD_TABLE},
    "lora-all-linear": {
        "method": "lora",
        "lr": method_by_name("lora").lr,
        "method_options": {"target_modules": "all-linear"},
    },
    "bitfit": {
        "method": "selective",
        "lr": 1e-3,
        "method_options": {"target_modules": None, "bias_only": True},
    },
    "norms": {
        "method": "selective",
        "lr": 1e-3,
        "method_options": {"target_modules": None, "norms_only": True},
    },
    # "last-N-layers" (any N) is resolved against the model's layer count: see _last_layers
}
LAST_LAYERS = re.compile(r"last-(\d+)-layers?")
DEFAULT_METHODS = (
    "full",
    "last-2-layers",
    "lora",
    "lora-all-linear",
    "dora",
    "ia3",
    "adapter",
    "prompt",
    "prefix",
)
COMPARE_KEYS = ("methods", "ranks", "rank_sweep", "general_text")
# Settings that do not change a method's result: a finished method is reused when only these differ.
NOT_IN_FINGERPRINT = frozenset(
    {
        "output_dir",
        "overwrite",
        "resume",
        "threads",
        "log_every",
        "save_every",
        "keep_checkpoints",
        "eval_every",
    }
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class PlannedRun:
    """One method of the comparison.

    Attributes:
        name: its row in the report and its directory under ``runs/``.
        config: its complete ``peftkit train`` settings (``output_dir`` = ``<report>/runs/<name>``).
        fingerprint: a hash of everything that decides its result (a rerun skips a method whose saved
            result has the same fingerprint).
    """

    name: str
    config: TrainConfig

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.config)

    @property
    def rank(self) -> int | None:
        """The LoRA rank, for LoRA and DoRA runs."""
        r = self.config.method_options.get("r") if self.config.method in ("lora", "dora") else None
        return int(r) if r is not None else None


@dataclass(frozen=True)
class ComparePlan:
    """Everything ``peftkit compare`` will do.

    Attributes:
        shared: the settings every method shares (and the base model's evaluation uses).
        runs: the methods, in order (sweep points that are not listed methods come last).
        sweep: names of the runs in the rank sweep, by increasing rank (empty without ``ranks``).
        output_dir: the report directory.
        general_text: the forgetting probe.
    """

    shared: TrainConfig
    runs: tuple[PlannedRun, ...]
    sweep: tuple[str, ...]
    output_dir: Path
    general_text: Path

    def run(self, name: str) -> PlannedRun:
        return next(run for run in self.runs if run.name == name)


def fingerprint(config: TrainConfig) -> str:
    """A short hash of the settings that decide a run's result."""
    data = {k: v for k, v in config.to_dict().items() if k not in NOT_IN_FINGERPRINT}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_plan(
    path: str | Path | None,
    overrides: Mapping[str, Any] | None = None,
    num_layers: int | None = None,
) -> ComparePlan:
    """Read a compare file (or start from the defaults) and apply command-line ``overrides``.

    Args:
        path: the YAML file, or None for the defaults (the default model and task, :data:`DEFAULT_METHODS`).
        overrides: keys as in the file (``methods``, ``ranks``, ``max_steps``…), winning over it.
        num_layers: the model's decoder layer count, to resolve ``last-N-layers`` (read from the model's
            config when None and needed).

    Raises:
        UsageError: a missing or malformed file, an unknown key or preset (with the closest known one),
            a bad value, duplicate method names.
    """
    data = read_yaml_mapping(path, "compare file") if path is not None else {}
    data = {key.replace("-", "_"): value for key, value in {**data, **(overrides or {})}.items()}
    return make_plan(data, source=str(path) if path else "the command line", num_layers=num_layers)


def make_plan(data: Mapping[str, Any], source: str = "compare", num_layers: int | None = None) -> ComparePlan:
    """A :class:`ComparePlan` from a compare file's contents (see the module docstring)."""
    data = dict(data)
    compare = {key: data.pop(key) for key in COMPARE_KEYS if key in data}
    if data.get("estimate_only"):
        raise UsageError("estimate_only: use peftkit compare --dry-run to see the plan's memory and time")
    for key in ("method", "method_options"):
        if key in data:
            raise UsageError(
                f"{key!r} in {source}: a comparison lists its methods under 'methods:', e.g. "
                "methods: [full, lora, {name: lora-r16, preset: lora, r: 16}]"
            )
    for key in data:
        if key not in FIELDS:
            hint = closest(key, [*FIELDS, *COMPARE_KEYS], ALIASES)
            raise UsageError(
                f"unknown key {key!r} in {source}{hint}; compare takes the keys of peftkit train plus "
                f"{', '.join(COMPARE_KEYS)}"
            )
    output_dir = Path(str(data.pop("output_dir", DEFAULT_OUTPUT)))
    shared = with_task_defaults(apply_overrides(TrainConfig(), data, source))
    shared = dataclasses.replace(shared, output_dir=str(output_dir))
    layers = _layer_count(shared, num_layers)

    entries = compare.get("methods", list(DEFAULT_METHODS))
    if isinstance(entries, str):
        entries = [part for part in entries.split(",") if part]
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"methods in {source} must be a non-empty list of presets or mappings")
    runs: list[PlannedRun] = []
    for entry in entries:
        name, changes = _resolve_entry(entry, source, layers)
        if any(run.name == name for run in runs):
            raise UsageError(f"method name {name!r} appears twice in {source}; give each a distinct 'name'")
        runs.append(PlannedRun(name, _run_config(shared, changes, output_dir / "runs" / name, name, source)))

    _check_objectives(runs, source)
    sweep = _sweep(compare, runs, shared, output_dir, source, layers)
    general_text = Path(str(compare.get("general_text", GENERAL_TEXT)))
    if not general_text.is_file():
        raise UsageError(f"general_text {general_text} (from {source}) is not a file")
    return ComparePlan(shared, tuple(runs), sweep, output_dir, general_text)


def _check_objectives(runs: list[PlannedRun], source: str) -> None:
    """SFT and preference objectives need different data: one comparison trains one kind."""
    kinds = {run.config.objective == "sft" for run in runs}
    if len(kinds) > 1:
        sft = next(run.name for run in runs if run.config.objective == "sft")
        pairs = next(run for run in runs if run.config.objective != "sft")
        raise UsageError(
            f"methods in {source} mix objectives sft ({sft}) and {pairs.config.objective} ({pairs.name}), "
            "which need different data (answers vs pairs); compare them in two comparisons"
        )


def _resolve_entry(entry: Any, source: str, layers: int | None) -> tuple[str, dict[str, Any]]:
    """``(name, train-config changes)`` of one ``methods:`` entry."""
    if isinstance(entry, str):
        return entry, _preset(entry, source, layers)
    if not isinstance(entry, Mapping):
        raise UsageError(f"a method in {source} must be a preset name or a mapping, not {entry!r}")
    entry = {str(k).replace("-", "_"): v for k, v in entry.items()}
    preset = entry.pop("preset", None)
    base = _preset(str(preset), source, layers) if preset is not None else {}
    name = str(entry.pop("name", preset or entry.get("method", "")))
    if not name:
        raise UsageError(f"a method in {source} needs a 'name' (or a 'preset' or 'method'): {entry}")
    options = dict(base.get("method_options", {}))
    if "method" in entry and entry["method"] != base.get("method"):
        options = {}  # another method: the preset's options do not apply
    options.update(entry.pop("method_options", None) or {})
    method = entry.get("method", base.get("method"))
    if method is None:
        raise UsageError(f"method {name!r} in {source} needs 'method:' or 'preset:'")
    flat = {key: entry.pop(key) for key in list(entry) if key not in FIELDS}
    known = method_fields(method)
    for key, value in flat.items():
        if key not in known:
            raise UsageError(
                f"unknown key {key!r} for method {name!r} in {source}: not a train setting nor an option of "
                f"{method!r}{closest(key, [*FIELDS, *known], ALIASES)}"
            )
        options[key] = value
    return name, {**base, **entry, "method": method, "method_options": options}


def _preset(name: str, source: str, layers: int | None) -> dict[str, Any]:
    match = LAST_LAYERS.fullmatch(name)
    if match:
        return _last_layers(int(match.group(1)), layers, source)
    if name not in PRESETS:
        raise UsageError(
            f"unknown method preset {name!r} in {source}; presets: {', '.join(PRESETS)}, last-N-layers"
            f"{closest(name, PRESETS)}"
        )
    return {**PRESETS[name], "method_options": dict(PRESETS[name].get("method_options", {}))}


def _last_layers(n: int, layers: int | None, source: str) -> dict[str, Any]:
    """Selective fine-tuning of the last ``n`` decoder layers (every parameter in them)."""
    if layers is None:
        raise UsageError(f"last-{n}-layers (in {source}): the model's config does not give its layer count")
    if not 1 <= n <= layers:
        raise UsageError(f"last-{n}-layers (in {source}): the model has {layers} layers; use 1 to {layers}")
    chosen = list(range(layers - n, layers))
    return {
        "method": "selective",
        "lr": 1e-4,
        "method_options": {"target_modules": None, "layers_to_transform": chosen},
    }


def _run_config(
    shared: TrainConfig, changes: dict[str, Any], output: Path, name: str, source: str
) -> TrainConfig:
    if not _NAME.fullmatch(name):
        raise UsageError(f"method name {name!r} in {source}: use letters, digits and . _ + - only")
    values = {key: value for key, value in changes.items() if key != "method_options"}
    for key in ("output_dir", "resume", "overwrite"):
        if key in values:
            raise UsageError(f"method {name!r} in {source} sets {key!r}; compare decides it")
    config = dataclasses.replace(shared, method_options={})
    config = apply_overrides(config, {**values, "output_dir": str(output)}, f"method {name!r} in {source}")
    options = dict(changes.get("method_options") or {})
    entry = method_entry(config.method)
    # the method's defaults written out, so the report, the fingerprint and the sweep see what trains
    return dataclasses.replace(config, method_options=entry.options(options) if entry else options)


def _sweep(
    compare: dict[str, Any],
    runs: list[PlannedRun],
    shared: TrainConfig,
    output_dir: Path,
    source: str,
    layers: int | None,
) -> tuple[str, ...]:
    """Add the rank sweep's runs to ``runs`` (reusing equal ones); their names by increasing rank."""
    ranks = compare.get("ranks")
    if ranks is None:
        return ()
    if isinstance(ranks, (int, str)):
        ranks = [part for part in str(ranks).split(",") if part]
    try:
        ranks = sorted({int(r) for r in ranks})
    except (TypeError, ValueError):
        raise UsageError(f"ranks in {source} must be whole numbers such as 1,2,4,8, not {ranks!r}") from None
    if not ranks or ranks[0] < 1:
        raise UsageError(f"ranks in {source} must be positive, got {ranks}")
    if "rank_sweep" in compare:
        base_name, base = _resolve_entry(compare["rank_sweep"], source, layers)
    else:
        listed = next((run for run in runs if run.config.method == "lora"), None)
        base_name = listed.name if listed else "lora"
        base = (
            {"method": "lora", "lr": listed.config.lr, "method_options": dict(listed.config.method_options)}
            if listed
            else _preset("lora", source, layers)
        )
    if base.get("method") not in ("lora", "dora"):
        raise UsageError(f"rank_sweep in {source} must be a LoRA or DoRA method, not {base.get('method')!r}")
    stem = re.sub(r"-r\d+$", "", base_name)
    names = []
    for r in ranks:
        options = {**base["method_options"], "r": r, "lora_alpha": SWEEP_ALPHA_PER_RANK * r}
        name = f"{stem}-r{r}"
        candidate = PlannedRun(
            name,
            _run_config(
                shared, {**base, "method_options": options}, output_dir / "runs" / name, name, source
            ),
        )
        same = next((run for run in runs if run.fingerprint == candidate.fingerprint), None)
        if same is None:
            if any(run.name == name for run in runs):
                raise UsageError(
                    f"rank sweep run {name!r} clashes with a listed method of that name; rename it"
                )
            runs.append(candidate)
        names.append(same.name if same else name)
    return tuple(names)


def _layer_count(shared: TrainConfig, given: int | None) -> int | None:
    """The model's decoder layer count (from its config file; no weights are read)."""
    if given is not None:
        return given
    try:
        from peftkit.memory import load_model_config

        config = load_model_config(shared.model)
    except (OSError, ValueError):
        return None
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)


def describe(run: PlannedRun) -> str:
    """``lora r=8 (q_proj, k_proj…) lr 0.001``: a run in a few words."""
    config = run.config
    options = ", ".join(f"{k}={_short(v)}" for k, v in config.method_options.items() if v is not None)
    text = f"{config.method}" + (f" ({options})" if options else "") + f", lr {config.lr:g}"
    if config.objective != "sft":
        given = [f"{k}={getattr(config, k)}" for k in OPTION_NAMES]
        text += f", objective {config.objective}" + "".join(f" {g}" for g in given if not g.endswith("=None"))
    return text


def _short(value: Any) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str):
        text = ",".join(str(v) for v in value)
        return text if len(text) <= 30 else text[:27] + "..."
    return str(value)
