"""Hugging Face PEFT as an oracle for adapter arithmetic, where its maths is exact.

- ``cat``: HF PEFT concatenates ``w·s·A`` and ``B`` as peftkit does, so every module's ΔW must agree,
  mixed ranks, alphas, rsLoRA and rank/alpha patterns included (with a non-rsLoRA adapter first: HF
  PEFT copies the first adapter's ``use_rslora`` into a config whose ``lora_alpha = r``, which scales
  the result by √r when that adapter is rsLoRA).
- ``svd`` on adapters of equal rank: both take the truncated SVD of ``Σ wᵢ·ΔWᵢ`` (not on a Conv1d,
  where HF PEFT 0.21.2 fails).
- Files: the adapter peftkit builds (mixed ranks written as ``rank_pattern``) loads in HF PEFT and
  gives the same logits.

HF PEFT's other types combine A and B separately and are not compared. Tolerances: fp32; 1e-6 absolute
on ΔW entries of size ~0.1 for ``cat`` (same products), 1e-5 for ``svd`` (two LAPACK calls) and on
outputs (summation order).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import peftkit
from peftkit.core.layer import AdapterLayer

from helpers.arithmetic import two_lora_configs
from helpers.layer_methods import logits
from helpers.tiny_models import TINY_MODELS, TinyModel, randomize_adapters, twin

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {tiny.name: tiny for tiny in TINY_MODELS}
WEIGHTS = [0.7, -0.3]
MIN_EFFECT = 1e-3


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """HF PEFT warns about Conv1D fan_in_fan_out and other things these cases do on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def both_libraries(
    tiny: TinyModel, a: peftkit.LoraConfig, b: peftkit.LoraConfig, directory: Path
) -> tuple[peftkit.PeftModel, Any, Any]:
    """(peftkit with random adapters "a" and "b", HF PEFT with the same two loaded from peftkit's files,
    an untouched copy of the base)."""
    base = tiny.make()
    reference, for_hf = twin(base), twin(base)
    model = peftkit.wrap(base, a, "a")
    model.add_adapter("b", b)
    randomize_adapters(model, seed=0, scale=0.2)
    model.save_pretrained(directory)
    hf = peft.PeftModel.from_pretrained(for_hf, directory / "a", adapter_name="a")
    hf.load_adapter(directory / "b", adapter_name="b")
    return model.eval(), hf.eval(), reference


def ours_deltas(model: peftkit.PeftModel, name: str) -> dict[str, Tensor]:
    return {
        path: layer.adapters[name].delta_weight().detach()
        for path, layer in model.model.named_modules()
        if isinstance(layer, AdapterLayer) and name in layer.adapters
    }


def hf_deltas(model: Any, name: str) -> dict[str, Tensor]:
    from peft.tuners.lora import LoraLayer

    return {
        path.removeprefix("base_model.model."): module.get_delta_weight(name).detach()
        for path, module in model.named_modules()
        if isinstance(module, LoraLayer) and (name in module.lora_A or name in module.lora_embedding_A)
    }


def assert_same_deltas(ours: dict[str, Tensor], theirs: dict[str, Tensor], atol: float) -> None:
    assert set(ours) == set(theirs)
    assert max(d.abs().max().item() for d in ours.values()) > MIN_EFFECT
    for path, delta in ours.items():
        torch.testing.assert_close(delta, theirs[path], atol=atol, rtol=0, msg=path)


def test_cat_gives_hf_peft_cats_updates(tiny: TinyModel, tmp_path: Path) -> None:
    model, hf, _ = both_libraries(tiny, *two_lora_configs(tiny), tmp_path)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "c", "cat")
    hf.add_weighted_adapter(["a", "b"], WEIGHTS, "c", combination_type="cat")
    assert_same_deltas(ours_deltas(model, "c"), hf_deltas(hf, "c"), atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gpt2", "mlp-conv"])
def test_svd_of_equal_ranks_gives_hf_peft_svds_updates(name: str, tmp_path: Path) -> None:
    tiny = MODELS[name]
    # HF PEFT 0.21.2's svd flattens Conv2d updates only and fails on a Conv1d (a 3-d update)
    targets = [target for target in tiny.targets if target != "conv1d"]
    a = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    b = peftkit.LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=targets[:2])
    model, hf, _ = both_libraries(tiny, a, b, tmp_path)
    for rank in (2, 4):
        model.add_weighted_adapter(["a", "b"], WEIGHTS, f"c{rank}", "svd", svd_rank=rank)
        hf.add_weighted_adapter(["a", "b"], WEIGHTS, f"c{rank}", combination_type="svd", svd_rank=rank)
        assert_same_deltas(ours_deltas(model, f"c{rank}"), hf_deltas(hf, f"c{rank}"), atol=1e-5)


@pytest.mark.parametrize(
    ("combination_type", "options"),
    [("cat", {}), ("ties_svd", {"density": 0.6, "svd_rank": 3}), ("svd", {})],
)
def test_hf_peft_loads_the_combined_adapter_with_equal_logits(
    tiny: TinyModel, combination_type: str, options: dict, tmp_path: Path
) -> None:
    model, _, reference = both_libraries(tiny, *two_lora_configs(tiny), tmp_path / "inputs")
    base_out = logits(twin(reference), tiny)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "c", combination_type, **options)
    model.save_pretrained(tmp_path / "out", selected_adapters=["c"])
    model.set_adapter("c")
    ours = logits(model, tiny)
    hf = peft.PeftModel.from_pretrained(reference, tmp_path / "out" / "c").eval()
    assert (ours - base_out).abs().max() > MIN_EFFECT
    torch.testing.assert_close(logits(hf, tiny), ours, atol=1e-5, rtol=0)
