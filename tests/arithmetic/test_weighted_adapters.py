"""``PeftModel.add_weighted_adapter`` on tiny models: identities, exactness, fits, refusals, the result.

The reference for a combination is computed without peftkit's arithmetic: the base weights of an
independent copy of the model get ``Σ wᵢ·ΔWᵢ`` added by hand, ΔWᵢ being each input adapter's own
update, or NumPy's SVD for the fits. Tolerances: fp32, outputs of size ~1; 1e-5 absolute on outputs
(summation order), 1e-6 on weight updates of size ~0.1, 1e-5 on SVD-based quantities.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import peftkit
from peftkit.arithmetic import COMBINATION_TYPES
from peftkit.arithmetic.weighted import lora_factors
from peftkit.core.layer import AdapterLayer

from helpers.arithmetic import two_lora_configs as configs
from helpers.layer_methods import logits
from helpers.tiny_models import TINY_MODELS, TinyModel, randomize_adapters, twin

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
MIN_EFFECT = 1e-3  # the adapters must move the outputs at least this much, or equality proves nothing
MODELS = {tiny.name: tiny for tiny in TINY_MODELS}
WEIGHTS = [0.7, -0.3]


def two_adapter_model(tiny: TinyModel, seed: int = 0) -> tuple[peftkit.PeftModel, nn.Module]:
    """(a wrapped model with random adapters "a" and "b", an independent copy of its base)."""
    base = tiny.make()
    reference = twin(base)
    a, b = configs(tiny)
    model = peftkit.wrap(base, a, "a")
    model.add_adapter("b", b)
    randomize_adapters(model, seed=seed, scale=0.2)
    return model.eval(), reference


def layers(model: peftkit.PeftModel) -> dict[str, AdapterLayer]:
    return {path: m for path, m in model.model.named_modules() if isinstance(m, AdapterLayer)}


def delta(model: peftkit.PeftModel, path: str, name: str) -> Tensor:
    """ΔW of adapter ``name`` at ``path`` in the base weight's layout; zero where it is absent."""
    layer = layers(model)[path]
    if name not in layer.adapters:
        return torch.zeros_like(layer.base.weight)
    return layer.adapters[name].delta_weight().detach()


def hand_sum(model: peftkit.PeftModel, names: list[str], weights: list[float]) -> dict[str, Tensor]:
    return {
        path: sum(w * delta(model, path, n) for n, w in zip(names, weights, strict=True))
        for path in layers(model)
    }


def output_with(model: peftkit.PeftModel, tiny: TinyModel, adapter: str) -> Tensor:
    model.set_adapter(adapter)
    return logits(model, tiny)


def add_to_base(reference: nn.Module, updates: dict[str, Tensor]) -> nn.Module:
    with torch.no_grad():
        for path, update in updates.items():
            reference.get_submodule(path).weight.add_(update)
    return reference


# ---------------------------------------------------------------------------------------- exact types
@pytest.mark.parametrize("combination_type", ["linear", "cat"])
def test_exact_types_are_the_base_plus_the_weighted_sum_applied_by_hand(
    tiny: TinyModel, combination_type: str
) -> None:
    model, reference = two_adapter_model(tiny)
    base_out = logits(reference, tiny)
    report = model.add_weighted_adapter(["a", "b"], WEIGHTS, "c", combination_type)
    expected = logits(add_to_base(reference, hand_sum(model, ["a", "b"], WEIGHTS)), tiny)
    combined = output_with(model, tiny, "c")
    assert (expected - base_out).abs().max() > MIN_EFFECT
    torch.testing.assert_close(combined, expected, atol=ATOL, rtol=0)
    assert report.total_error == 0.0 and set(report.errors.values()) == {0.0}
    # rank = the sum of the ranks of the adapters present at each module
    for path, rank in report.ranks.items():
        present = [n for n in ("a", "b") if n in layers(model)[path].adapters]
        assert rank == sum(lora_factors(layers(model)[path].adapters[n])[0].shape[0] for n in present)
    assert all(layer.adapters["c"].scaling == 1.0 for layer in layers(model).values())


def test_lora_factors_multiply_to_each_adapters_update(tiny: TinyModel) -> None:
    model, _ = two_adapter_model(tiny)
    for layer in layers(model).values():
        for adapter in layer.adapters.values():
            A, B, s = lora_factors(adapter)
            product = (s * B @ A).reshape(adapter.delta_weight().T.shape if _transposed(adapter) else -1)
            expected = adapter.delta_weight().detach()
            expected = expected.T if _transposed(adapter) else expected.reshape(-1)
            torch.testing.assert_close(product.reshape(expected.shape), expected, atol=1e-6, rtol=0)


def _transposed(adapter: nn.Module) -> bool:
    """Embeddings and Conv1D keep ΔW as (in, out) in the base layout."""
    return isinstance(adapter, peftkit.methods.lora.LoraEmbedding) or getattr(adapter, "transposed", False)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_negation_gives_the_base_model(name: str) -> None:
    tiny = MODELS[name]
    model, reference = two_adapter_model(tiny)
    for combination_type in ("linear", "svd"):
        report = model.add_weighted_adapter(
            ["a", "a"], [1.0, -1.0], f"none_{combination_type}", combination_type
        )
        assert report.total_error == 0.0
        combined = output_with(model, tiny, f"none_{combination_type}")
        torch.testing.assert_close(combined, logits(reference, tiny), atol=ATOL, rtol=0)
        for path in layers(model):
            assert delta(model, path, f"none_{combination_type}").abs().max() < 1e-7


@pytest.mark.parametrize(
    ("combination_type", "options"),
    [
        ("linear", {}),
        ("cat", {}),
        ("svd", {}),
        ("ties", {"density": 1.0}),
        ("dare_linear", {"density": 1.0}),
        ("dare_ties_svd", {"density": 1.0}),
        ("magnitude_prune", {"density": 1.0}),
    ],
)
def test_weights_one_and_zero_reproduce_the_first_adapter(combination_type: str, options: dict) -> None:
    tiny = MODELS["llama"]
    model, _ = two_adapter_model(tiny)
    expected = output_with(model, tiny, "a")
    model.add_weighted_adapter(["a", "b"], [1.0, 0.0], "c", combination_type, seed=0, **options)
    torch.testing.assert_close(output_with(model, tiny, "c"), expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------- fits
def test_svd_error_falls_with_rank_and_is_zero_at_full_rank() -> None:
    tiny = MODELS["llama"]
    model, _ = two_adapter_model(tiny)
    targets = hand_sum(model, ["a", "b"], WEIGHTS)
    totals = []
    for rank in (1, 2, 3, 4, 6):  # Σ wᵢΔWᵢ has rank ≤ 4 + 2 = 6 where both adapters act
        report = model.add_weighted_adapter(["a", "b"], WEIGHTS, f"r{rank}", "svd", svd_rank=rank)
        fitted = {path: delta(model, path, f"r{rank}") for path in targets}
        # the reported errors are ‖T − ΔW_new‖ / ‖T‖, per module and over all modules
        for path, target in targets.items():
            independent = (target - fitted[path]).norm() / target.norm()
            assert report.errors[path] == pytest.approx(independent.item(), abs=1e-5)
        residual = math.sqrt(sum((targets[p] - fitted[p]).norm() ** 2 for p in targets))
        assert report.total_error == pytest.approx(
            residual / math.sqrt(sum(t.norm() ** 2 for t in targets.values())), abs=1e-5
        )
        totals.append(report.total_error)
    assert totals == sorted(totals, reverse=True) and totals[0] > 0.1
    assert totals[-1] < 1e-5


def test_svd_is_numpys_best_fit_at_the_default_rank() -> None:
    tiny = MODELS["llama"]
    model, _ = two_adapter_model(tiny)
    report = model.add_weighted_adapter(["a", "b"], WEIGHTS, "c", "svd")
    for path, target in hand_sum(model, ["a", "b"], WEIGHTS).items():
        ranks = [
            lora_factors(adapter)[0].shape[0]
            for n, adapter in layers(model)[path].adapters.items()
            if n != "c"
        ]
        assert report.ranks[path] == max(ranks)  # the largest input rank at that module
        U, S, Vh = np.linalg.svd(target.double().numpy(), full_matrices=False)
        k = report.ranks[path]
        best = torch.from_numpy(U[:, :k] * S[:k] @ Vh[:k]).float()
        torch.testing.assert_close(delta(model, path, "c"), best, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "combination_type", [t for t in COMBINATION_TYPES if t.startswith(("ties", "dare", "magnitude"))]
)
def test_pruning_types_run_and_fit_their_update(combination_type: str) -> None:
    tiny = MODELS["llama"]
    model, _ = two_adapter_model(tiny)
    report = model.add_weighted_adapter(
        ["a", "b"], WEIGHTS, "c", combination_type, svd_rank=3, density=0.5, seed=0
    )
    assert set(report.ranks.values()) == {3}
    assert 0 < report.total_error < 1
    assert not torch.equal(output_with(model, tiny, "c"), output_with(model, tiny, "a"))


def test_dare_is_deterministic_for_a_seed() -> None:
    tiny = MODELS["llama"]
    model, _ = two_adapter_model(tiny)
    for name, seed in (("s0", 0), ("s0_again", 0), ("s1", 1)):
        model.add_weighted_adapter(["a", "b"], WEIGHTS, name, "dare_ties", density=0.5, seed=seed)
    state = {name: model.adapter_state_dict(name) for name in ("s0", "s0_again", "s1")}
    assert all(torch.equal(state["s0"][k], state["s0_again"][k]) for k in state["s0"])
    assert any(not torch.equal(state["s0"][k], state["s1"][k]) for k in state["s0"])


# ---------------------------------------------------------------------------------------- sources
def test_pissa_adapters_combine_with_their_initial_part() -> None:
    tiny = MODELS["llama"]
    base = tiny.make()
    model = peftkit.wrap(
        base, peftkit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"), "p"
    )
    model.add_adapter("a", peftkit.LoraConfig(r=3, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, seed=1, scale=0.2)  # trained factors differ from the initial ones
    model.add_weighted_adapter(["p", "a"], [0.5, 2.0], "c", "linear")
    for path, expected in hand_sum(model, ["p", "a"], [0.5, 2.0]).items():
        assert expected.abs().max() > MIN_EFFECT
        torch.testing.assert_close(delta(model, path, "c"), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "config",
    [
        peftkit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True),
        peftkit.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        peftkit.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
        peftkit.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
        peftkit.HoulsbyConfig(bottleneck_size=4),
    ],
    ids=["dora", "ia3", "prompt", "prefix", "bottleneck"],
)
def test_other_methods_are_refused(config) -> None:
    model = peftkit.wrap(MODELS["llama"].make(), peftkit.LoraConfig(r=4, target_modules=["q_proj"]), "a")
    model.add_adapter("other", config)
    with pytest.raises(ValueError, match=r"adapter 'other' is .*only LoRA adapters"):
        model.add_weighted_adapter(["a", "other"], [1.0, 1.0], "c", "linear")
    assert list(model.peft_config) == ["a", "other"]


@pytest.mark.parametrize(
    ("config", "what"),
    [
        (peftkit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
        (peftkit.LoraConfig(r=4, target_modules=["q_proj"], bias="all"), "biases"),
    ],
)
def test_adapters_training_more_than_lora_are_refused(config, what: str) -> None:
    model = peftkit.wrap(MODELS["llama"].make(), config, "a")
    with pytest.raises(ValueError, match=f"also trains {what}"):
        model.add_weighted_adapter(["a"], [1.0], "c", "linear")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [1.0]}, "1 weights for 2 adapters"),
        ({"weights": [1.0, float("nan")]}, "finite numbers"),
        ({"combination_type": "average"}, "combination_type='average' must be one of"),
        ({"adapters": ["a", "nope"]}, r"unknown adapter\(s\) \['nope'\]"),
        ({"adapters": "a", "weights": [1.0]}, "non-empty list"),
        ({"combination_type": "ties"}, "needs the share of entries"),
        ({"combination_type": "dare_linear", "density": 1.5}, r"in \(0, 1\]"),
        ({"combination_type": "svd", "density": 0.5}, "density=0.5 applies to"),
        ({"combination_type": "linear", "svd_rank": 4}, "linear and cat are exact"),
        ({"combination_type": "svd", "svd_rank": 0}, "positive integer"),
        ({"combination_type": "cat", "svd_clamp": 0.9}, "no fit to clamp"),
        ({"combination_type": "svd", "majority_sign_method": "frequency"}, "applies to"),
        ({"combination_type": "ties", "density": 0.5, "majority_sign_method": "mean"}, "must be one of"),
        ({"adapter_name": "a"}, "exists already; pick another name or pass overwrite=True"),
        ({"adapter_name": "x.y"}, "without '.'"),
    ],
)
def test_bad_arguments_are_refused_and_nothing_is_added(kwargs: dict, message: str) -> None:
    model, _ = two_adapter_model(MODELS["llama"])
    call = {"adapters": ["a", "b"], "weights": WEIGHTS, "adapter_name": "c", "combination_type": "svd"}
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(**{**call, **kwargs})
    assert list(model.peft_config) == ["a", "b"]


def test_overwrite_replaces_an_existing_adapter_and_keeps_it_active() -> None:
    tiny = MODELS["llama"]
    model, _ = two_adapter_model(tiny)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "c", "linear")
    model.set_adapter(["a", "c"])
    model.add_weighted_adapter(["b"], [2.0], "c", "linear", overwrite=True)
    assert model.active_adapters == ["a", "c"]
    for path in layers(model):
        torch.testing.assert_close(delta(model, path, "c"), 2.0 * delta(model, path, "b"), atol=1e-6, rtol=0)
    # an adapter may be replaced by a combination of itself
    model.add_weighted_adapter(["c"], [-1.0], "c", "cat", overwrite=True)
    for path in layers(model):
        torch.testing.assert_close(delta(model, path, "c"), -2.0 * delta(model, path, "b"), atol=1e-6, rtol=0)


def test_a_merged_adapter_is_not_overwritten() -> None:
    model, _ = two_adapter_model(MODELS["llama"])
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "c", "linear")
    model.merge_adapter(["c"])
    with pytest.raises(ValueError, match="'c' is merged; call unmerge_adapter"):
        model.add_weighted_adapter(["a"], [1.0], "c", "linear", overwrite=True)
    assert model.merged_adapters == ["c"]


def test_modules_only_some_adapters_target_get_only_theirs() -> None:
    model, _ = two_adapter_model(MODELS["llama"])
    report = model.add_weighted_adapter(["a", "b"], WEIGHTS, "c", "linear")
    for path, layer in layers(model).items():
        owners = [n for n in ("a", "b") if n in layer.adapters]
        assert report.ranks[path] > 0 and owners
        expected = sum(
            w * delta(model, path, n) for n, w in zip(["a", "b"], WEIGHTS, strict=True) if n in owners
        )
        torch.testing.assert_close(delta(model, path, "c"), expected, atol=1e-6, rtol=0)
    assert {p.rsplit(".", 1)[1] for p in report.ranks} == {"q_proj", "v_proj"}


# ---------------------------------------------------------------------------------------- the result
@pytest.mark.parametrize("name", ["llama", "gpt2", "mlp-conv"])
def test_the_result_is_an_ordinary_adapter(name: str, tmp_path: Path) -> None:
    tiny = MODELS[name]
    model, reference = two_adapter_model(tiny)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "c", "ties_svd", density=0.7)
    assert model.active_adapters == ["a"]  # added, not switched to
    unmerged = output_with(model, tiny, "c")
    model.merge_adapter()
    torch.testing.assert_close(logits(model, tiny), unmerged, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    model.save_pretrained(tmp_path, selected_adapters=["c"])
    saved = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    ranks = {path: layer.adapters["c"].delta_weight().shape for path, layer in layers(model).items()}
    assert saved["peft_type"] == "LORA" and saved["lora_alpha"] == saved["r"]
    assert saved["rank_pattern"] == saved["alpha_pattern"]
    assert len(set(saved["rank_pattern"].values()) | {saved["r"]}) > 1, "mixed ranks need a pattern"
    assert len(saved["target_modules"]) == len(ranks)
    reloaded = peftkit.load(reference, tmp_path / "c")
    torch.testing.assert_close(logits(reloaded, tiny), unmerged, atol=ATOL, rtol=0)
    assert (unmerged - output_with(model, tiny, "a")).abs().max() > MIN_EFFECT
