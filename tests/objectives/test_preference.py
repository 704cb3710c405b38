"""DPO, ORPO and SimPO (objectives/preference.py) against the papers' formulas written out here, and
against TRL's own loss functions (``ORPOTrainer.odds_ratio_loss``, ``CPOTrainer.cpo_loss`` with
``loss_type="simpo"``) called on the same log-probabilities. DPO against TRL's whole trainer:
tests/integrations/test_trl_dpo.py and tests/training/test_preference_run.py.

Tolerance 1e-6 (float32 arithmetic of values of order 1); the objective's step-0 DPO loss is ln 2 to 1e-7.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import peftkit
from peftkit.objectives.choice import PreferenceSettings
from peftkit.objectives.pair_batch import collate_pairs
from peftkit.objectives.preference import (
    dpo_losses,
    log1mexp,
    orpo_losses,
    pair_scores,
    preference_objective,
    simpo_losses,
)
from peftkit.objectives.sequences import sequence_log_probs

from helpers.tiny_lm import build_model

generator = torch.Generator().manual_seed(0)
CHOSEN = -torch.rand(6, generator=generator, dtype=torch.float64) * 20 - 0.5  # summed log-probs
REJECTED = -torch.rand(6, generator=generator, dtype=torch.float64) * 20 - 0.5
REF_CHOSEN = CHOSEN + torch.randn(6, generator=generator, dtype=torch.float64)
REF_REJECTED = REJECTED + torch.randn(6, generator=generator, dtype=torch.float64)
LENGTHS = torch.tensor([3, 7, 12, 1, 5, 9, 4, 7, 2, 10, 6, 8])  # chosen then rejected


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_is_the_papers_equation_7() -> None:
    beta = 0.1
    got = dpo_losses(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta)
    for i in range(6):
        margin = beta * (CHOSEN[i] - REF_CHOSEN[i]).item() - beta * (REJECTED[i] - REF_REJECTED[i]).item()
        assert got[i].item() == pytest.approx(-math.log(sigmoid(margin)), abs=1e-9)


def test_dpo_is_ln2_when_the_policy_is_the_reference() -> None:
    assert torch.allclose(
        dpo_losses(CHOSEN, REJECTED, CHOSEN, REJECTED, 0.1),
        torch.full((6,), math.log(2), dtype=torch.float64),
    )


def test_dpo_with_rpo_alpha_adds_the_chosen_answers_mean_nll() -> None:
    beta, alpha = 0.1, 0.7
    sums, reference = torch.cat([CHOSEN, REJECTED]), torch.cat([REF_CHOSEN, REF_REJECTED])
    plain = pair_scores(PreferenceSettings.of("dpo", beta=beta), sums, LENGTHS, reference)
    rpo = pair_scores(PreferenceSettings.of("dpo", beta=beta, rpo_alpha=alpha), sums, LENGTHS, reference)
    for i in range(6):
        margin = beta * (CHOSEN[i] - REF_CHOSEN[i]).item() - beta * (REJECTED[i] - REF_REJECTED[i]).item()
        nll = -CHOSEN[i].item() / LENGTHS[i].item()  # per token of the chosen answer only
        assert rpo.losses[i].item() == pytest.approx(-math.log(sigmoid(margin)) + alpha * nll, abs=1e-5)
    torch.testing.assert_close(rpo.margins, plain.margins, atol=0, rtol=0)  # rewards unchanged


def test_rpo_alpha_equals_trls_sft_loss_type_on_equal_lengths() -> None:
    """TRL 1.16's ``loss_type="sft"`` term: ``−mean`` of the chosen per-token log-probs over the batch."""
    alpha, length = 0.5, 5
    per_token = -torch.rand(6, length, generator=torch.Generator().manual_seed(1)) * 3  # chosen tokens
    mask = torch.ones(6, length, dtype=torch.bool)
    trl_sft = -per_token[mask].mean()  # dpo_trainer.py, ``elif loss_type == "sft"``
    sums = torch.cat([per_token.sum(1), REJECTED.float()])
    reference = torch.cat([per_token.sum(1), REJECTED.float()])  # policy = reference: DPO term ln 2
    counts = torch.full((12,), length)
    settings = PreferenceSettings.of("dpo", rpo_alpha=alpha)
    losses = pair_scores(settings, sums, counts, reference).losses
    torch.testing.assert_close(losses.mean(), math.log(2) + alpha * trl_sft, atol=1e-6, rtol=0)


def test_orpo_is_the_papers_equations_4_to_7() -> None:
    beta = 0.25
    chosen_mean, rejected_mean = CHOSEN / 10, REJECTED / 10
    got = orpo_losses(chosen_mean, rejected_mean, beta)
    for i in range(6):
        p_w, p_l = math.exp(chosen_mean[i].item()), math.exp(rejected_mean[i].item())
        odds_ratio = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
        expected = -chosen_mean[i].item() - beta * math.log(sigmoid(math.log(odds_ratio)))
        assert got[i].item() == pytest.approx(expected, abs=1e-9)


def test_orpo_equals_trls_odds_ratio_loss() -> None:
    trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    beta = 0.1
    chosen_mean, rejected_mean = (CHOSEN / 10).float(), (REJECTED / 10).float()
    stub = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_terms = trl_orpo.ORPOTrainer.odds_ratio_loss(stub, chosen_mean, rejected_mean)[0]
    # TRL's loss is nll - terms.mean(); ours per pair is nll_i - term_i
    torch.testing.assert_close(
        orpo_losses(chosen_mean, rejected_mean, beta) + chosen_mean, -trl_terms, atol=1e-6, rtol=0
    )


def test_log1mexp_is_stable_on_both_sides_of_the_split() -> None:
    x = torch.tensor([-1e-8, -0.5, -0.6931, -0.7, -30.0], dtype=torch.float64)
    expected = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), expected, atol=1e-12, rtol=1e-12)


def test_simpo_is_the_papers_equation_6() -> None:
    beta, gamma = 2.0, 0.5
    chosen_mean, rejected_mean = CHOSEN / LENGTHS[:6], REJECTED / LENGTHS[6:]
    got = simpo_losses(chosen_mean, rejected_mean, beta, gamma)
    for i in range(6):
        reward_gap = beta * chosen_mean[i].item() - beta * rejected_mean[i].item()
        assert got[i].item() == pytest.approx(-math.log(sigmoid(reward_gap - gamma)), abs=1e-9)
    with_nll = simpo_losses(chosen_mean, rejected_mean, beta, gamma, cpo_alpha=0.3)
    torch.testing.assert_close(with_nll, got - 0.3 * chosen_mean, atol=1e-12, rtol=0)


def test_simpo_equals_trls_cpo_loss() -> None:
    trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    beta, gamma = 2.0, 0.7
    chosen_mean, rejected_mean = (CHOSEN / LENGTHS[:6]).float(), (REJECTED / LENGTHS[6:]).float()
    stub = SimpleNamespace(
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=0.0,
        loss_type="simpo",
        alpha=0.0,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    trl_losses, trl_chosen, trl_rejected = trl_cpo.CPOTrainer.cpo_loss(stub, chosen_mean, rejected_mean)
    torch.testing.assert_close(
        simpo_losses(chosen_mean, rejected_mean, beta, gamma), trl_losses, atol=1e-6, rtol=0
    )
    sums = torch.cat([CHOSEN, REJECTED]).float()
    scores = pair_scores(PreferenceSettings.of("simpo", beta=beta, simpo_gamma=gamma), sums, LENGTHS)
    torch.testing.assert_close(scores.chosen_rewards, trl_chosen, atol=1e-6, rtol=0)
    torch.testing.assert_close(scores.rejected_rewards, trl_rejected, atol=1e-6, rtol=0)


def test_pair_scores_rewards_margins_and_ties() -> None:
    sums = torch.tensor([-3.0, -5.0, -2.0, -4.0, -5.0, -1.0])
    reference = torch.tensor([-3.0, -4.0, -3.0, -4.0, -4.0, -2.0])
    scores = pair_scores(PreferenceSettings.of("dpo", beta=0.5), sums, torch.ones(6), reference)
    assert scores.chosen_rewards.tolist() == [0.0, -0.5, 0.5]
    assert scores.rejected_rewards.tolist() == [0.0, -0.5, 0.5]
    assert scores.margins.tolist() == [0.0, 0.0, 0.0]
    assert scores.correct.tolist() == [0.5, 0.5, 0.5]
    reference = torch.tensor([-4.0, -4.0, -2.0, -4.0, -5.0, -1.0])
    scores = pair_scores(PreferenceSettings.of("dpo", beta=0.5), sums, torch.ones(6), reference)
    assert scores.margins.tolist() == [0.5, -0.5, 0.0]
    assert scores.correct.tolist() == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="reference"):
        pair_scores(PreferenceSettings.of("dpo"), sums, torch.ones(6))


def test_settings_fill_defaults_and_refuse_other_objectives_options() -> None:
    assert PreferenceSettings.of("simpo") == PreferenceSettings("simpo", 2.0, 0.5, 0.0)
    assert PreferenceSettings.of("dpo", rpo_alpha=1.0).rpo_alpha == 1.0
    with pytest.raises(ValueError, match="rpo_alpha"):
        PreferenceSettings.of("simpo", rpo_alpha=1.0)
    assert PreferenceSettings.of("dpo", beta=0.3, reference="runs/sft").beta == 0.3
    with pytest.raises(ValueError, match="simpo_gamma"):
        PreferenceSettings.of("dpo", simpo_gamma=1.0)


def test_objective_of_an_untrained_adapter_gives_ln2_per_pair() -> None:
    model = peftkit.wrap(build_model(60, seed=3), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    rows = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7], "chosen_ids": [8, 9, 10], "rejected_ids": [11, 12]},
    ]
    batch = collate_pairs(rows, pad_id=0, shared_prompt=True)
    with torch.no_grad(), model.disable_adapters():
        reference, _ = sequence_log_probs(model, batch)
    batch["reference_log_probs"] = reference
    objective = preference_objective(PreferenceSettings.of("dpo"))
    loss, pairs = objective(model, batch)
    assert pairs.item() == 2
    assert abs(loss.item() / 2 - math.log(2)) < 1e-7
    metrics = objective.take_metrics()
    assert metrics["reward_margin"].item() == 0.0 and metrics["reward_accuracy"].item() == 1.0
    assert objective.take_metrics() == {}
