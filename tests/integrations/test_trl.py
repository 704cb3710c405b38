"""peftkit.integrations.SFTTrainer (TRL) against TRL's own SFTTrainer on Hugging Face PEFT.

The same tiny Llama (tests/helpers/tiny_lm.py, tied embeddings), data, seed and starting adapter values go
through both; the oracle is Hugging Face PEFT's run. Tolerances: per-step losses and the trained
adapter values to 1e-5 in fp32; with TRL's defaults (bf16 autocast, gradient checkpointing) losses to
1e-3 and values to 1e-4. Measured: equal in every case here. The slow test does the same on SmolLM2.
Every other method family trains under SFTTrainer and checkpoints its adapter (exact).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.foundation.io import read_adapter

from helpers.tiny_lm import build_model, build_tokenizer

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

from peftkit.integrations import SFTTrainer  # noqa: E402  (needs trl)

pytestmark = pytest.mark.usefixtures("one_thread")

PEOPLE = [
    ("Ada Park", 36, "surgeon"),
    ("Bo Li", 29, "painter"),
    ("Cy Diaz", 41, "pilot"),
    ("Di Ng", 52, "chef"),
]


def conversations() -> datasets.Dataset:
    """Prompt/completion chat rows: TRL trains on the completion only."""
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Describe {name}."}],
            "completion": [{"role": "assistant", "content": f"{name}, {age}, works as a {job}."}],
        }
        for name, age, job in PEOPLE * 2
    ]
    return datasets.Dataset.from_list(rows)


CASES = {
    "lora": (lambda: peftkit.LoraConfig(**LORA), lambda: peft.LoraConfig(**LORA), {}),
    "lora-trl-defaults": (
        lambda: peftkit.LoraConfig(**LORA),
        lambda: peft.LoraConfig(**LORA),
        {"bf16": None, "gradient_checkpointing": True},
    ),
    "prompt-tuning": (
        lambda: peftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        lambda: peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        {},
    ),
}
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}


def sft_config(output_dir: Path, **changes: object) -> trl.SFTConfig:
    settings = {
        "output_dir": str(output_dir),
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "learning_rate": 5e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "max_length": 64,
        "seed": 0,
        "disable_tqdm": True,
        "log_level": "error",
        **changes,
    }
    return trl.SFTConfig(**settings)


def step_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("case", list(CASES))
def test_sft_trainer_gives_hf_peft_losses(case: str, tokenizer, tmp_path: Path) -> None:
    ours_config, theirs_config, changes = CASES[case]
    ours = peftkit.wrap(build_model(len(tokenizer)), ours_config())
    with torch.no_grad():  # random starting values (LoRA's B is zero at init), then the same in both
        generator = torch.Generator().manual_seed(3)
        for param in ours.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    start = {key: t.detach().clone() for key, t in ours.adapter_state_dict("default").items()}
    theirs = peft.get_peft_model(build_model(len(tokenizer)), theirs_config())
    peft.set_peft_model_state_dict(theirs, start)

    trainer = SFTTrainer(
        ours,
        sft_config(tmp_path / "ours", **changes),
        train_dataset=conversations(),
        processing_class=tokenizer,
    )
    trainer.train()
    oracle = trl.SFTTrainer(
        theirs,
        sft_config(tmp_path / "theirs", **changes),
        train_dataset=conversations(),
        processing_class=tokenizer,
    )
    oracle.train()

    losses, expected = step_losses(trainer), step_losses(oracle)
    fp32 = not changes
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert abs(expected[-1] - expected[0]) > 1e-3, "the runs should train (else equal losses prove little)"
    assert losses == pytest.approx(expected, abs=1e-5 if fp32 else 1e-3, rel=0)
    trained = peft.get_peft_model_state_dict(theirs)
    for key, value in ours.adapter_state_dict("default").items():
        torch.testing.assert_close(value.detach(), trained[key], atol=1e-5 if fp32 else 1e-4, rtol=0)


METHODS = {
    "dora": lambda: peftkit.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"]),
    "ia3": lambda: peftkit.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]
    ),
    "houlsby": lambda: peftkit.HoulsbyConfig(reduction_factor=4),
    "norms": lambda: peftkit.SelectiveConfig(norms_only=True),
    "p-tuning": lambda: peftkit.PromptEncoderConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prefix": lambda: peftkit.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_sft_trainer_trains_every_method_and_checkpoints_its_adapter(
    method: str, tokenizer, tmp_path
) -> None:
    """Two steps move every trainable tensor and nothing else; the checkpoint is the saved adapter.
    TRL's default gradient checkpointing, except for prefix tuning, which refuses it."""
    model = peftkit.wrap(build_model(len(tokenizer)), METHODS[method]())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    config = sft_config(
        tmp_path, max_steps=2, save_strategy="steps", save_steps=2, gradient_checkpointing=method != "prefix"
    )
    trainer = SFTTrainer(model, config, train_dataset=conversations(), processing_class=tokenizer)

    trainer.train()

    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert trainable and changed == trainable
    assert all(math.isfinite(loss) for loss in step_losses(trainer))
    _, saved = read_adapter(tmp_path / "checkpoint-2")
    for key, value in model.adapter_state_dict("default").items():
        torch.testing.assert_close(saved[key], value.detach(), atol=0, rtol=0)


def test_sft_trainer_saves_adapters_and_resumes_exactly(tokenizer, tmp_path: Path) -> None:
    """Checkpoints are adapter directories; resuming from step 2 repeats steps 3-4 (1e-6)."""

    def lora_model() -> peftkit.PeftModel:
        torch.manual_seed(0)
        return peftkit.wrap(build_model(len(tokenizer)), peftkit.LoraConfig(**{**LORA, "lora_dropout": 0.1}))

    model = lora_model()
    config = sft_config(tmp_path / "run", save_strategy="steps", save_steps=2)
    uninterrupted = SFTTrainer(model, config, train_dataset=conversations(), processing_class=tokenizer)
    uninterrupted.train()
    uninterrupted.save_model(tmp_path / "final")
    checkpoint = tmp_path / "run" / "checkpoint-2"

    files = {path.name for path in checkpoint.iterdir()} | {
        path.name for path in (tmp_path / "final").iterdir()
    }
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
    assert "model.safetensors" not in files
    _, final = read_adapter(tmp_path / "final")
    for key, value in model.adapter_state_dict("default").items():
        torch.testing.assert_close(final[key], value.detach(), atol=0, rtol=0)

    resumed = SFTTrainer(
        lora_model(),
        sft_config(tmp_path / "resumed"),
        train_dataset=conversations(),
        processing_class=tokenizer,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert step_losses(resumed)[2:] == pytest.approx(step_losses(uninterrupted)[2:], abs=1e-6, rel=0)


@pytest.mark.slow
def test_sft_trainer_on_smollm2_gives_hf_peft_losses(tmp_path: Path) -> None:
    """LoRA on q/v of SmolLM2-135M-Instruct, 3 steps of 2 rows, fp32: losses as Hugging Face PEFT's (1e-4)."""
    from peftkit.foundation.loading import load_model

    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
    base, tokenizer = load_model()
    ours = peftkit.wrap(base, peftkit.LoraConfig(**config))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for param in ours.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    start = {key: t.detach().clone() for key, t in ours.adapter_state_dict("default").items()}
    theirs = peft.get_peft_model(load_model()[0], peft.LoraConfig(**config))
    peft.set_peft_model_state_dict(theirs, start)
    changes = {"max_steps": 3, "learning_rate": 1e-3, "max_length": 128}

    trainer = SFTTrainer(
        ours,
        sft_config(tmp_path / "ours", **changes),
        train_dataset=conversations(),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(tmp_path / "adapter")
    oracle = trl.SFTTrainer(
        theirs,
        sft_config(tmp_path / "theirs", **changes),
        train_dataset=conversations(),
        processing_class=tokenizer,
    )
    oracle.train()

    losses, expected = step_losses(trainer), step_losses(oracle)
    assert losses == pytest.approx(expected, abs=1e-4, rel=0)
    assert abs(expected[-1] - expected[0]) > 1e-3
    reloaded = peftkit.load(load_model()[0], tmp_path / "adapter")
    for key, value in reloaded.adapter_state_dict("default").items():
        torch.testing.assert_close(value, ours.adapter_state_dict("default")[key].detach(), atol=0, rtol=0)
