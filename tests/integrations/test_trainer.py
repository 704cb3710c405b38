"""peftkit.integrations.Trainer: checkpoints and save_model() as adapter directories, exact resume.

On the tiny Llama of ``tests/helpers/tiny_lm.py`` (tied embeddings, which transformers.Trainer's whole-model
fallback cannot even write) with its tiny tokenizer, fp32 on the CPU. References: the same run on
Hugging Face PEFT (losses and trained values to 1e-5), HF PEFT loading the saved directory (logits to
1e-5), and the same run without interruption (losses and adapter values to 1e-6). Measured: equal.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.foundation.io import read_adapter
from peftkit.integrations import Trainer, load_saved_adapters
from peftkit.objectives import tokens as loss_module
from peftkit.ops import fused_cross_entropy

from helpers.tiny_lm import build_model, build_tokenizer

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-6
TARGETS = ["q_proj", "v_proj"]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
WHOLE_MODEL_FILES = {"model.safetensors", "pytorch_model.bin"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def rows(tokenizer) -> datasets.Dataset:
    """12 short sentences tokenized, plus a text column the model does not take."""
    texts = [f"{name} is a {job} in {city}." for name, job, city in SENTENCES]
    encoded = tokenizer(texts)
    return datasets.Dataset.from_dict({**encoded, "text": texts})


SENTENCES = [
    (name, job, city)
    for name, job in [("Ada Park", "surgeon"), ("Bo Li", "painter"), ("Cy Diaz", "pilot")]
    for city in ["Toronto", "Lima", "Oslo", "Pune"]
]


def lora_model(tokenizer, seed: int = 0, **changes: object) -> peftkit.PeftModel:
    torch.manual_seed(seed)  # the same base and the same adapter initialisation for the same seed
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "lora_dropout": 0.1, **changes}
    return peftkit.wrap(build_model(len(tokenizer), seed=seed), peftkit.LoraConfig(**options))


def make_trainer(
    model, tokenizer, rows, output_dir: Path, trainer_class: type = Trainer, **changes: object
) -> transformers.Trainer:
    settings = {
        "output_dir": str(output_dir),
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_steps": 3,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "log_level": "error",
        **changes,
    }
    return trainer_class(
        model=model,
        args=transformers.TrainingArguments(**settings),
        train_dataset=rows,
        eval_dataset=rows.select(range(4)),
        data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )


def step_losses(trainer: Trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def adapter_values(model: peftkit.PeftModel) -> dict[str, torch.Tensor]:
    return {key: t.detach().clone() for key, t in model.adapter_state_dict("default").items()}


def test_checkpoints_and_save_model_hold_adapter_directories_hf_peft_loads(tokenizer, rows, tmp_path) -> None:
    model = lora_model(tokenizer)
    trainer = make_trainer(model, tokenizer, rows, tmp_path / "run", max_steps=3)
    trainer.train()
    trainer.save_model(tmp_path / "final")
    checkpoint = tmp_path / "run" / "checkpoint-3"

    files = {path.name for path in checkpoint.iterdir()}
    assert ADAPTER_FILES | {"optimizer.pt", "scheduler.pt", "trainer_state.json", "tokenizer.json"} <= files
    assert not files & WHOLE_MODEL_FILES
    final_files = {path.name for path in (tmp_path / "final").iterdir()}
    assert ADAPTER_FILES | {"tokenizer.json", "training_args.bin"} <= final_files
    assert not final_files & WHOLE_MODEL_FILES
    _, saved = read_adapter(checkpoint)
    for key, value in adapter_values(model).items():
        torch.testing.assert_close(saved[key], value, atol=0, rtol=0)  # written at the last step

    oracle = peft.PeftModel.from_pretrained(
        build_model(len(tokenizer), seed=0), str(tmp_path / "final")
    ).eval()
    input_ids = torch.tensor(tokenizer(["Bo Li is a pilot in Oslo."])["input_ids"])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        with model.disable_adapters():
            base_logits = model(input_ids=input_ids).logits
        torch.testing.assert_close(oracle(input_ids=input_ids).logits, logits, atol=1e-5, rtol=0)
    assert (logits - base_logits).abs().max() > 1e-3, "training should have moved the adapter"


def test_training_gives_hf_peft_losses(tokenizer, rows, tmp_path) -> None:
    """The same run (start values, data, seed; gradient accumulation 2) through transformers.Trainer on
    Hugging Face PEFT: the same per-step losses and trained adapter (1e-5; measured equal)."""
    model = lora_model(tokenizer, lora_dropout=0.0)
    with torch.no_grad():  # LoRA's B starts at zero: give both runs the same random start instead
        generator = torch.Generator().manual_seed(3)
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    oracle = peft.get_peft_model(
        build_model(len(tokenizer), seed=0),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0),
    )
    peft.set_peft_model_state_dict(oracle, adapter_values(model))
    changes = {"max_steps": 3, "gradient_accumulation_steps": 2, "save_strategy": "no"}

    start = adapter_values(model)
    trainer = make_trainer(model, tokenizer, rows, tmp_path / "ours", **changes)
    trainer.train()
    reference = make_trainer(oracle, tokenizer, rows, tmp_path / "theirs", transformers.Trainer, **changes)
    reference.train()

    losses, expected = step_losses(trainer), step_losses(reference)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses.values())
    assert losses == pytest.approx(expected, abs=1e-5, rel=0)
    assert any((value - start[key]).abs().max() > 1e-3 for key, value in adapter_values(model).items())
    trained = peft.get_peft_model_state_dict(oracle)
    for key, value in adapter_values(model).items():
        torch.testing.assert_close(value, trained[key], atol=1e-5, rtol=0)


def test_resume_from_checkpoint_continues_the_run_exactly(tokenizer, rows, tmp_path) -> None:
    """Steps 4-6 after resuming from checkpoint-3 repeat the uninterrupted run's losses (dropout on:
    Trainer restores the random state, the optimizer and the scheduler; we restore the adapter)."""
    model = lora_model(tokenizer)
    uninterrupted = make_trainer(model, tokenizer, rows, tmp_path / "run")
    uninterrupted.train()
    expected, expected_values = step_losses(uninterrupted), adapter_values(model)

    fresh = lora_model(tokenizer)
    initial = adapter_values(fresh)
    _, at_step_3 = read_adapter(tmp_path / "run" / "checkpoint-3")
    assert any(not torch.equal(at_step_3[key], initial[key]) for key in initial), "loading must matter"
    resumed = make_trainer(fresh, tokenizer, rows, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))

    losses = step_losses(resumed)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(loss) for loss in losses.values())
    assert [losses[step] for step in (4, 5, 6)] == pytest.approx([expected[s] for s in (4, 5, 6)], abs=ATOL)
    for key, value in adapter_values(fresh).items():
        torch.testing.assert_close(value, expected_values[key], atol=ATOL, rtol=0)


def test_resume_refuses_a_model_set_up_otherwise(tokenizer, rows, tmp_path) -> None:
    make_trainer(lora_model(tokenizer), tokenizer, rows, tmp_path / "run", max_steps=3).train()
    checkpoint = str(tmp_path / "run" / "checkpoint-3")

    other_alpha = make_trainer(lora_model(tokenizer, lora_alpha=16), tokenizer, rows, tmp_path / "a")
    with pytest.raises(ValueError, match="lora_alpha: 8 in the file, 16 here"):
        other_alpha.train(resume_from_checkpoint=checkpoint)
    two_adapters = lora_model(tokenizer)
    two_adapters.add_adapter("other", peftkit.LoraConfig(r=2, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"holds the adapters \['default'\] and this model has"):
        make_trainer(two_adapters, tokenizer, rows, tmp_path / "b").train(resume_from_checkpoint=checkpoint)


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(tokenizer, rows, tmp_path) -> None:
    """The best checkpoint by eval loss, counted as greater-is-better so that it is an early one."""
    model = lora_model(tokenizer, lora_dropout=0.0)
    trainer = make_trainer(
        model,
        tokenizer,
        rows,
        tmp_path / "run",
        max_steps=3,
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
    )
    trainer.train()

    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != "checkpoint-3"
    _, best_values = read_adapter(best)
    _, last_values = read_adapter(tmp_path / "run" / "checkpoint-3")
    values = adapter_values(model)
    for key, value in values.items():
        torch.testing.assert_close(value, best_values[key], atol=0, rtol=0)
    assert any(not torch.equal(values[key], last_values[key]) for key in values)


def test_load_saved_adapters_restores_every_adapter_by_name(tokenizer, tmp_path) -> None:
    """ "default" in the directory, any other adapter in its subdirectory (HF PEFT's layout)."""
    model = lora_model(tokenizer)
    model.add_adapter("other", peftkit.LoraConfig(r=2, target_modules=["k_proj"]))
    saved = {
        name: {k: v.detach().clone() for k, v in model.adapter_state_dict(name).items()}
        for name in ("default", "other")
    }
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)

    load_saved_adapters(model, tmp_path)

    assert (tmp_path / "other" / "adapter_config.json").is_file()
    for name, tensors in saved.items():
        for key, value in model.adapter_state_dict(name).items():
            torch.testing.assert_close(value, tensors[key], atol=0, rtol=0)


def test_other_models_are_saved_as_trainer_saves_them(tokenizer, rows, tmp_path) -> None:
    """A model without peftkit adapters is Trainer's business: its whole weights, its config."""
    model = build_model(len(tokenizer))
    trainer = make_trainer(model, tokenizer, rows, tmp_path / "run", max_steps=1, save_strategy="no")

    trainer.save_model(tmp_path / "plain")

    files = {path.name for path in (tmp_path / "plain").iterdir()}
    assert {"model.safetensors", "config.json"} <= files and not files & ADAPTER_FILES


def test_trainer_steps_use_the_fused_loss_and_train_as_the_models_own(
    tokenizer, rows, tmp_path, monkeypatch
) -> None:
    """FusedLoss: every training micro-batch goes through objectives.tokens' fused head, with the losses of
    the model's own loss (1e-5 relative: chunked float32 sums); label smoothing keeps Trainer's path."""
    calls: list[int] = []
    real = loss_module.linear_cross_entropy
    monkeypatch.setattr(loss_module, "linear_cross_entropy", lambda *a: calls.append(1) or real(*a))

    def losses(name: str, **changes: object) -> list[float]:
        model = lora_model(tokenizer, lora_dropout=0.0)
        settings = {"max_steps": 4, "gradient_accumulation_steps": 2, "save_strategy": "no", **changes}
        trainer = make_trainer(model, tokenizer, rows, tmp_path / name, eval_strategy="no", **settings)
        trainer.train()
        return list(step_losses(trainer).values())

    fused = losses("fused")
    assert len(calls) == 4 * 2  # every micro-batch of every step
    with fused_cross_entropy(False):
        plain = losses("plain")
    assert len(calls) == 8 and len(fused) == len(plain) == 4
    assert fused == pytest.approx(plain, rel=1e-5)
    smoothed = losses("smoothed", label_smoothing_factor=0.1)  # reads the logits
    assert len(calls) == 8 and len(smoothed) == 4


def test_plain_transformers_trainer_warns_once_that_it_saves_the_whole_model(
    tokenizer, rows, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers.Trainer cannot be taught to save the adapter (docs/design.md): it says so, once."""
    import peftkit.model.plain_trainer

    monkeypatch.setattr(peftkit.model.plain_trainer, "_warned", False)
    model = lora_model(tokenizer)
    plain = make_trainer(model, tokenizer, rows, tmp_path / "plain", transformers.Trainer, max_steps=1)
    # contextlib.suppress: the tiny Llama's tied embeddings make Trainer's whole-model fallback fail too
    warns = pytest.warns(UserWarning, match=r"use peftkit\.integrations\.Trainer")
    with warns as first, contextlib.suppress(RuntimeError):
        plain.save_model(str(tmp_path / "plain" / "one"))
    assert len([w for w in first if "peftkit.integrations.Trainer" in str(w.message)]) == 1
    with warnings.catch_warnings(record=True) as second:
        warnings.simplefilter("always")
        with contextlib.suppress(RuntimeError):
            plain.save_model(str(tmp_path / "plain" / "two"))
        model.state_dict()  # any other caller: no warning
    assert not [w for w in second if "peftkit.integrations.Trainer" in str(w.message)]
    monkeypatch.setattr(peftkit.model.plain_trainer, "_warned", False)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        make_trainer(model, tokenizer, rows, tmp_path / "ours", max_steps=1).save_model(str(tmp_path / "o"))
    assert not [w for w in ours if "peftkit.integrations.Trainer" in str(w.message)]
