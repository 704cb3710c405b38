"""A peftkit PeftModel where transformers expects a model: config, generate, checkpointing, Trainer.

All on the tiny random Llama of ``helpers.tiny_models`` (fp32, CPU). Tolerances: 1e-5 absolute on losses and
gradients; token ids and untouched weights compared exactly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest
import torch
from torch import Tensor, nn

import peftkit

from helpers.tiny_models import SEQ, TINY_MODELS, VOCAB, randomize_adapters, twin

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
LLAMA = next(model for model in TINY_MODELS if model.name == "llama")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW_TOKENS = 6


def lora_config(**changes: object) -> peftkit.LoraConfig:
    return peftkit.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **changes})


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """transformers' deprecation notices (gradient_checkpointing_enable → activation_…) are not under test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def greedy(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Greedy decoding without generate or a KV cache: argmax of a full forward per step."""
    ids = input_ids
    for _ in range(NEW_TOKENS):
        next_ids = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)  # (batch, 1)
        ids = torch.cat([ids, next_ids], dim=1)
    return ids


def generate(model: nn.Module, input_ids: Tensor) -> Tensor:
    # min_new_tokens: an eos drawn by the random model must not end a row early (pads would differ).
    return model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        pad_token_id=0,
    )


def lora_grads(model: peftkit.PeftModel) -> dict[str, Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- attributes
def test_config_and_generation_config_are_the_base_models() -> None:
    base = LLAMA.make()
    model = peftkit.wrap(base, lora_config())

    assert model.config is base.config
    assert model.config.model_type == "llama"
    assert model.generation_config is base.generation_config
    assert model.main_input_name == "input_ids"
    assert model.get_input_embeddings() is base.model.embed_tokens


# ----------------------------------------------------------------------------- generate
@torch.no_grad()
def test_generate_at_init_equals_base_generate() -> None:
    """B = 0 at init: greedy generate through the PeftModel gives the base model's tokens."""
    base = LLAMA.make()
    expected = generate(twin(base), LLAMA.inputs()["input_ids"])
    model = peftkit.wrap(base, lora_config()).eval()

    actual = generate(model, LLAMA.inputs()["input_ids"])

    assert actual.shape == (LLAMA.inputs()["input_ids"].shape[0], SEQ + NEW_TOKENS)
    assert torch.equal(actual, expected)


@torch.no_grad()
def test_generate_uses_the_adapter() -> None:
    """With random adapters, generate (KV cache) gives the tokens of a plain argmax loop over forward."""
    base = LLAMA.make()
    input_ids = LLAMA.inputs()["input_ids"]
    base_tokens = generate(twin(base), input_ids)
    model = peftkit.wrap(base, lora_config()).eval()
    randomize_adapters(model, seed=3, scale=0.5)

    actual = generate(model, input_ids)

    assert torch.equal(actual, greedy(model, input_ids))
    assert not torch.equal(actual, base_tokens), "the adapter should change the greedy continuation"


# ----------------------------------------------------------------------------- checkpointing
def training_step(model: peftkit.PeftModel) -> tuple[Tensor, dict[str, Tensor], int]:
    """One forward/backward in train mode: (loss, adapter grads, calls of the first q_proj)."""
    calls = 0

    def count(*_: object) -> None:
        nonlocal calls
        calls += 1

    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    handle = q_proj.register_forward_hook(count)
    try:
        model.train()
        model.zero_grad()
        input_ids = LLAMA.inputs()["input_ids"]
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
    finally:
        handle.remove()
    return loss.detach(), lora_grads(model), calls


def test_gradient_checkpointing_gives_the_same_loss_and_grads() -> None:
    """Checkpointing recomputes the blocks in backward and changes neither loss nor LoRA gradients."""
    base = LLAMA.make()
    plain = peftkit.wrap(twin(base), lora_config(lora_dropout=0.0))
    randomize_adapters(plain, seed=4)
    checkpointed = peftkit.wrap(twin(base), lora_config(lora_dropout=0.0))
    randomize_adapters(checkpointed, seed=4)
    assert base.config.attention_dropout == 0.0

    checkpointed.gradient_checkpointing_enable()
    loss, grads, calls = training_step(checkpointed)
    expected_loss, expected_grads, plain_calls = training_step(plain)

    assert checkpointed.get_base_model().is_activation_checkpointing
    assert (plain_calls, calls) == (1, 2), "a checkpointed block runs again in backward"
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected_loss, atol=ATOL, rtol=0)
    assert grads.keys() == expected_grads.keys()
    assert any(".lora_B." in name for name in grads)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, f"{name} got no gradient"
        torch.testing.assert_close(grad, expected_grads[name], atol=ATOL, rtol=0)


def test_gradient_checkpointing_at_init_gives_lora_b_grads() -> None:
    """At init (B = 0) only B gets a gradient, also under checkpointing (frozen embeddings)."""
    model = peftkit.wrap(LLAMA.make(), lora_config())
    model.gradient_checkpointing_enable()

    _, grads, _ = training_step(model)

    b_grads = {name: g for name, g in grads.items() if ".lora_B." in name}
    assert len(b_grads) == 2 * len(TARGETS)  # two layers
    assert all(grad.abs().max() > 0 for grad in b_grads.values())


def test_gradient_checkpointing_enable_uses_no_deprecated_transformers_api() -> None:
    model = peftkit.wrap(LLAMA.make(), lora_config())

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model.gradient_checkpointing_enable()

    assert model.get_base_model().is_activation_checkpointing


def test_activation_checkpointing_enable_names_what_a_plain_model_lacks() -> None:
    model = peftkit.wrap(TINY_MODELS[0].make(), peftkit.LoraConfig(r=2, target_modules=["lin1"]))

    with pytest.raises(TypeError, match=r"TinyConvMLP has no activation checkpointing.*use_reentrant=False"):
        model.activation_checkpointing_enable()


# ----------------------------------------------------------------------------- Trainer
class TokenDataset(torch.utils.data.Dataset):
    """Seeded random token rows; labels are the inputs (causal LM)."""

    def __init__(self, rows: int = 8, seed: int = 5) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, VOCAB, (rows, SEQ), generator=generator)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.input_ids[index]}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_trainer_trains_only_the_lora_parameters(tmp_path: Path, checkpointing: bool) -> None:
    """Trainer (default arguments: unused columns removed) runs 3 steps on a PeftModel (optionally
    turning on checkpointing itself): finite losses, every lora_B moved, nothing else moved."""
    model = peftkit.wrap(LLAMA.make(), lora_config())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        activation_checkpointing=checkpointing,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset())

    result = trainer.train()

    assert model.get_base_model().is_activation_checkpointing == checkpointing
    assert result.global_step == 3
    assert math.isfinite(result.training_loss)
    step_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(step_losses) == 3 and all(math.isfinite(loss) for loss in step_losses)
    assert trainable and all(".adapters." in name for name in trainable)
    after = dict(model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    assert changed <= trainable
    assert {name for name in trainable if ".lora_B." in name} <= changed


def trainer_arguments(output_dir: Path, **changes: object) -> transformers.TrainingArguments:
    """Trainer's defaults (remove_unused_columns=True) but for a short, quiet, seeded CPU run."""
    settings = {
        "output_dir": str(output_dir),
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        **changes,
    }
    return transformers.TrainingArguments(**settings)


def token_rows(rows: int = 6, seed: int = 5) -> datasets.Dataset:
    """A datasets.Dataset with the model's columns and two it does not take (text, source)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, SEQ), generator=generator).tolist()
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids,
            "attention_mask": [[1] * SEQ for _ in ids],
            "labels": ids,
            "text": ["a row the tokenizer made"] * rows,
            "source": list(range(rows)),
        }
    )


def test_trainer_keeps_the_columns_the_base_model_takes(tmp_path: Path) -> None:
    """remove_unused_columns=True (the default) drops exactly the columns the base's forward lacks."""
    model = peftkit.wrap(LLAMA.make(), lora_config())
    trainer = transformers.Trainer(model=model, args=trainer_arguments(tmp_path), train_dataset=token_rows())

    batch = next(iter(trainer.get_train_dataloader()))
    result = trainer.train()

    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert result.global_step == 3 and math.isfinite(result.training_loss)


def test_trainer_evaluate_reports_the_models_loss(tmp_path: Path) -> None:
    """Trainer finds the label names on the class (find_labels) and so reports eval_loss: the mean of
    the model's own loss over the evaluation batches (equal-sized), to 1e-6."""
    model = peftkit.wrap(LLAMA.make(), lora_config())
    randomize_adapters(model, seed=2)
    rows = token_rows(rows=4)
    trainer = transformers.Trainer(model=model, args=trainer_arguments(tmp_path), eval_dataset=rows)

    metrics = trainer.evaluate()

    assert trainer.label_names == ["labels"]
    model.eval()
    with torch.no_grad():
        losses = [
            model(**{key: torch.tensor(rows[key][start : start + 2]) for key in ("input_ids", "labels")}).loss
            for start in (0, 2)
        ]
    assert metrics["eval_loss"] == pytest.approx(torch.stack(losses).mean().item(), abs=1e-6)


def uses_reentrant(model: peftkit.PeftModel) -> bool:
    """The use_reentrant transformers bound into the first decoder layer's checkpoint function."""
    return model.get_base_model().model.layers[0]._gradient_checkpointing_func.keywords["use_reentrant"]


@pytest.mark.parametrize(
    ("dtype", "checkpointing_kwargs"),
    [(torch.float32, None), (torch.float32, {"use_reentrant": True}), (torch.bfloat16, None)],
    ids=["fp32-default", "fp32-reentrant", "bf16-base-default"],
)
def test_trainer_gradient_checkpointing_trains_the_adapters_with_unchanged_losses(
    tmp_path: Path, dtype: torch.dtype, checkpointing_kwargs: dict[str, bool] | None
) -> None:
    """Trainer's gradient_checkpointing=True on a wrapped model: non-reentrant unless asked, the same
    per-step losses as without checkpointing (the blocks are recomputed with the same arithmetic:
    equal here, atol 1e-6) and the adapters move. The bf16 base with fp32 adapters stands
    in for a frozen base of another type (quantized bases, once peftkit has them)."""

    def run(checkpointing: bool) -> tuple[peftkit.PeftModel, list[float]]:
        model = peftkit.wrap(LLAMA.make().to(dtype), lora_config(lora_dropout=0.0))
        args = trainer_arguments(
            tmp_path / str(checkpointing),
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs if checkpointing else None,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=token_rows())
        trainer.train()
        return model, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    checkpointed, losses = run(True)
    _, expected = run(False)

    assert checkpointed.get_base_model().is_activation_checkpointing
    assert uses_reentrant(checkpointed) == bool(checkpointing_kwargs)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert losses == pytest.approx(expected, abs=1e-6, rel=0)
    b_factors = [p for name, p in checkpointed.named_parameters() if ".lora_B." in name]
    assert b_factors and all(p.dtype == torch.float32 and p.abs().max() > 0 for p in b_factors)
