"""The method table: every registered method is reachable from the exports, the command line and compare,
and every config class is registered."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import peftkit
import peftkit.methods
from peftkit.cli import build_parser
from peftkit.compare.plan import PRESETS, make_plan
from peftkit.core.adapter_config import AdapterConfig
from peftkit.methods import METHOD_TABLE, config_classes
from peftkit.training.method_choice import METHOD_NAMES, build_method_config

from helpers.tiny_models import TINY_MODELS

NAMES = [entry.name for entry in METHOD_TABLE]
METHODS = config_classes()


def all_subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    return found.union(*(all_subclasses(sub) for sub in found)) if found else found


def method_config_classes() -> list[type[AdapterConfig]]:
    """Every config class with a ``peft_type`` defined under ``peftkit.methods``, each module imported
    first: a class is only a subclass once its module has run, and a method left out of the table is
    imported by nothing else."""
    for module in pkgutil.walk_packages(peftkit.methods.__path__, "peftkit.methods."):
        importlib.import_module(module.name)
    found = [cls for cls in all_subclasses(AdapterConfig) if cls.__module__.startswith("peftkit.methods.")]
    return [cls for cls in found if cls.peft_type]  # "": a shared base class


def test_every_config_class_is_registered_by_its_peft_type() -> None:
    # a new config class that is not in the table fails here
    classes = method_config_classes()
    assert {cls.__name__ for cls in classes} >= {"LoraConfig", "SelectiveConfig", "PrefixTuningConfig"}
    for cls in classes:
        assert cls.peft_type in METHODS, f"{cls.__name__} ({cls.peft_type}) is missing from METHOD_TABLE"
        assert issubclass(cls, METHODS[cls.peft_type])


def test_names_are_unique_and_families_known() -> None:
    assert len(set(NAMES)) == len(NAMES)
    assert {entry.family for entry in METHOD_TABLE} <= {"selective", "reparameterization", "additive"}


def test_the_package_root_exports_what_it_lists() -> None:
    assert set(peftkit.__all__) == {"__version__", *peftkit._EXPORTS}
    for name in peftkit.__all__:
        assert getattr(peftkit, name) is not None
    assert peftkit.foundation.loading.load_model is not None  # subpackages are attributes too


@pytest.mark.parametrize("entry", METHOD_TABLE, ids=NAMES)
def test_config_class_is_exported_from_the_package_root(entry) -> None:
    name = entry.config_class.__name__
    assert name in peftkit.__all__ and getattr(peftkit, name) is entry.config_class


@pytest.mark.parametrize("entry", METHOD_TABLE, ids=NAMES)
def test_method_is_a_command_line_choice_with_its_defaults(entry) -> None:
    assert entry.name in METHOD_NAMES
    config = build_method_config(entry.name, {}, "causal-lm")
    assert type(config) is entry.config_class
    for key, value in {**entry.defaults, **entry.fixed}.items():
        assert getattr(config, key) == value or list(getattr(config, key)) == list(value), key
    train_help = (
        next(a for a in build_parser()._actions if a.dest == "command").choices["train"].format_help()
    )
    assert entry.name in " ".join(train_help.split())


@pytest.mark.parametrize("entry", METHOD_TABLE, ids=NAMES)
def test_method_is_a_compare_preset_with_its_learning_rate(entry) -> None:
    assert PRESETS[entry.name] == {"method": entry.name, "lr": entry.lr}
    plan = make_plan({"methods": [entry.name], "model": "unused"}, num_layers=2)
    (run,) = plan.runs
    assert run.config.method == entry.name and run.config.lr == entry.lr
    assert run.config.method_options == {**entry.defaults}


def test_user_targets_drop_defaults_that_name_default_targets() -> None:
    ia3 = build_method_config("ia3", {"target_modules": ["v_proj"]}, "causal-lm")
    assert list(ia3.target_modules) == ["v_proj"] and not ia3.feedforward_modules
    dora = build_method_config("dora", {"r": 4}, "causal-lm")
    assert dora.use_dora and dora.r == 4 and dora.lora_alpha == 16


@pytest.mark.parametrize("entry", METHOD_TABLE, ids=NAMES)
def test_mergeable_says_whether_merge_adapter_works(entry) -> None:
    model = peftkit.wrap(TINY_MODELS[1].make(), build_method_config(entry.name, {}, "causal-lm"))
    if entry.config_class.mergeable:
        model.merge_adapter()
        assert model.merged_adapters == ["default"]
    else:
        with pytest.raises(NotImplementedError):
            model.merge_adapter()
