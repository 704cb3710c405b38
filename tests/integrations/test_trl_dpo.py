"""peftkit.integrations.DPOTrainer (TRL) against TRL's own DPOTrainer on Hugging Face PEFT.

The same tiny Llama (tests/helpers/tiny_lm.py), pairs, seed, batch order and starting adapter values go
through both; the oracle is Hugging Face PEFT's run, whose reference is the base with the adapter
disabled (or its ``"ref"`` adapter). Tolerance on each step's loss and the trained adapter: 1e-5 (fp32).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.training.tasks import BUILTIN_TASKS

from helpers.tiny_lm import build_model, build_tokenizer

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

from peftkit.integrations import DPOTrainer, ReferencePolicy  # noqa: E402  (needs trl)

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}


def pairs() -> datasets.Dataset:
    """Six pairs of the bundled preference task, as plain text (TRL adds the EOS token)."""
    lines = BUILTIN_TASKS["person-json-pairs"].train.read_text().splitlines()[:6]
    return datasets.Dataset.from_list([json.loads(line) for line in lines])


def dpo_config(output_dir: Path, **changes: object) -> trl.DPOConfig:
    settings = {
        "output_dir": str(output_dir),
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "learning_rate": 5e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "seed": 0,
        "disable_tqdm": True,
        "log_level": "error",
        **changes,
    }
    return trl.DPOConfig(**settings)


def step_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def random_adapter(model) -> dict[str, torch.Tensor]:
    with torch.no_grad():  # a non-zero start (LoRA's B is zero at init), then the same in both
        generator = torch.Generator().manual_seed(3)
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return {key: t.detach().clone() for key, t in model.adapter_state_dict("default").items()}


@pytest.mark.parametrize("precompute", [False, True], ids=["reference-in-step", "precomputed"])
def test_dpo_trainer_gives_hf_peft_losses(precompute: bool, tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    ours = peftkit.wrap(build_model(len(tokenizer)), peftkit.LoraConfig(**LORA))
    start = random_adapter(ours)
    theirs = peft.get_peft_model(build_model(len(tokenizer)), peft.LoraConfig(**LORA, task_type="CAUSAL_LM"))
    peft.set_peft_model_state_dict(theirs, start)

    changes = {"precompute_ref_log_probs": precompute}
    trainer = DPOTrainer(
        model=ours,
        args=dpo_config(tmp_path / "ours", **changes),
        train_dataset=pairs(),
        processing_class=tokenizer,
    )
    assert isinstance(trainer.ref_model, ReferencePolicy) and not list(trainer.ref_model.parameters())
    trainer.train()
    oracle = trl.DPOTrainer(
        model=theirs,
        args=dpo_config(tmp_path / "theirs", **changes),
        train_dataset=pairs(),
        processing_class=tokenizer,
    )
    oracle.train()

    losses, expected = step_losses(trainer), step_losses(oracle)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert abs(expected[-1] - expected[0]) > 1e-3, "the runs should train"
    assert losses == pytest.approx(expected, abs=1e-5, rel=0)
    trained = peft.get_peft_model_state_dict(theirs)
    for key, value in ours.adapter_state_dict("default").items():
        torch.testing.assert_close(value.detach(), trained[key], atol=1e-5, rtol=0)


def test_a_ref_adapter_is_the_reference_and_checkpoints_hold_adapters(tmp_path: Path) -> None:
    """Continuing from an SFT adapter (TRL's way: loaded twice, the copy named "ref"): step 1's loss is
    ln 2 (policy = reference), and a checkpoint holds the adapters, not the base model."""
    tokenizer = build_tokenizer()
    sft = peftkit.wrap(build_model(len(tokenizer)), peftkit.LoraConfig(**LORA))
    random_adapter(sft)
    sft.save_pretrained(tmp_path / "sft")
    model = peftkit.load(build_model(len(tokenizer)), tmp_path / "sft", is_trainable=True)
    model.load_adapter(tmp_path / "sft", adapter_name="ref")
    config = dpo_config(tmp_path / "run", save_strategy="steps", save_steps=3)
    trainer = DPOTrainer(model=model, args=config, train_dataset=pairs(), processing_class=tokenizer)
    trainer.train()
    losses = step_losses(trainer)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert model.active_adapters == ["default"]
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "ref").is_dir()
    assert not (checkpoint / "model.safetensors").exists()
