"""training/objective_settings.py: each objective's options filled with its defaults (TRL's, SimPO's
beta 2.0) and refused for another objective, in one line naming the setting and where it came from."""

from __future__ import annotations

import pytest

from peftkit.foundation.errors import UsageError
from peftkit.training.objective_settings import check_objective, with_objective_defaults
from peftkit.training.train_config import TrainConfig, load_config


def test_defaults_fill_only_the_objectives_unset_options() -> None:
    dpo = with_objective_defaults(TrainConfig(objective="dpo"))
    assert (dpo.beta, dpo.simpo_gamma, dpo.cpo_alpha, dpo.reference) == (0.1, None, None, None)
    assert dpo.rpo_alpha == 0.0
    simpo = with_objective_defaults(TrainConfig(objective="simpo", beta=1.5))
    assert (simpo.beta, simpo.simpo_gamma, simpo.cpo_alpha) == (1.5, 0.5, 0.0)
    assert with_objective_defaults(TrainConfig()) == TrainConfig()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"objective": "dpo", "simpo_gamma": 0.3},
            r"simpo_gamma \(from x.yaml\) is an option of objective simpo",
        ),
        (
            {"objective": "sft", "beta": 0.2},
            r"beta \(from x.yaml\) is an option of objective dpo, orpo or simpo",
        ),
        ({"objective": "orpo", "reference": "runs/sft"}, "add --objective dpo or leave reference out"),
        ({"objective": "dpo", "beta": 0.0}, r"beta=0.0 \(from x.yaml\) must be positive"),
        ({"objective": "simpo", "cpo_alpha": -1.0}, "cpo_alpha=-1.0 .* must be 0 or more"),
        ({"objective": "dpo", "rpo_alpha": -0.5}, "rpo_alpha=-0.5 .* must be 0 or more"),
        (
            {"objective": "simpo", "rpo_alpha": 1.0},
            "rpo_alpha .* is an option of objective dpo, not of 'simpo'",
        ),
        ({"objective": "dpo", "task": "seq-cls"}, "trains causal language models"),
        ({"objective": "dpo", "metric": "rouge1"}, "metric='rouge1' .* use metric auto"),
    ],
)
def test_an_option_of_another_objective_is_refused(changes: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        check_objective(TrainConfig(**changes), "x.yaml")


def test_a_preference_objectives_own_options_pass() -> None:
    check_objective(TrainConfig(objective="simpo", beta=2.5, simpo_gamma=0.3, cpo_alpha=0.5), "x.yaml")
    check_objective(TrainConfig(objective="dpo", beta=0.2, reference="runs/sft"), "x.yaml")
    check_objective(TrainConfig(objective="dpo", rpo_alpha=1.0), "x.yaml")


def test_the_bundled_pairs_give_dpo_and_only_dpo_the_chosen_answers_nll() -> None:
    dpo = load_config(None, {"objective": "dpo"})
    assert (dpo.data, dpo.rpo_alpha) == ("person-json-pairs", 1.0)
    assert load_config(None, {"objective": "dpo", "rpo_alpha": 0.0}).rpo_alpha == 0.0  # given: kept
    for objective in ("orpo", "simpo"):  # not theirs: left unset, so check_objective passes
        config = load_config(None, {"objective": objective})
        assert (config.data, config.rpo_alpha) == ("person-json-pairs", None)
    own_data = load_config(None, {"objective": "dpo", "data": "pairs.jsonl"})
    assert with_objective_defaults(own_data).rpo_alpha == 0.0  # plain DPO, TRL's default
