"""fused_model_loss and the Trainer's FusedLoss: the model's own loss without its logits.

Reference: the same model's own ``.loss`` (transformers' ``ForCausalLMLoss`` on whole logits) and its
gradients, on the tiny Llama of ``tests/helpers/tiny_lm.py`` (tied embeddings) with LoRA, fp32. Tolerance:
1e-6 relative on losses, 1e-5 absolute on gradients (chunked float32 sums in another order).
"""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.integrations import fused_loss as fused_loss_module
from peftkit.integrations.fused_loss import fused_model_loss
from peftkit.ops import fused_cross_entropy

from helpers.tiny_lm import build_model

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

VOCAB = 400


def lora_model(**changes: object) -> peftkit.PeftModel:
    torch.manual_seed(0)
    config = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **changes)
    model = peftkit.wrap(build_model(VOCAB, seed=0), config)
    with torch.no_grad():  # non-zero B: the adapter changes the loss and gets gradients through it
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (3, 9), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt not scored
    labels[2, 6:] = -100  # padding
    return {"input_ids": input_ids, "labels": labels}


def loss_and_grads(model: peftkit.PeftModel, fused: bool, **kwargs: object):
    model.zero_grad(set_to_none=True)
    if fused:
        with fused_model_loss(model) as applies:
            assert applies
            output = model(**batch(), **kwargs)
        assert output.logits.shape[-1] == 0  # no logits were made
    else:
        output = model(**batch(), **kwargs)
        assert output.logits.shape[-1] == VOCAB
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return output.loss.detach(), grads


@pytest.mark.parametrize("num_items", [None, 11, torch.tensor(11)], ids=["mean", "int", "tensor"])
def test_the_fused_loss_equals_the_models_own_loss_and_gradients(num_items) -> None:
    model = lora_model()
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    expected_loss, expected_grads = loss_and_grads(model, fused=False, **kwargs)
    loss, grads = loss_and_grads(model, fused=True, **kwargs)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=0, msg=name)


def test_the_model_is_as_before_after_the_block() -> None:
    model = lora_model()
    base, head = model.get_base_model(), model.get_base_model().lm_head
    with fused_model_loss(model):
        pass
    assert "forward" not in vars(head) and "_loss_function" not in vars(base)
    assert model(**batch()).logits.shape[-1] == VOCAB
    with pytest.raises(RuntimeError, match="boom"), fused_model_loss(model):
        raise RuntimeError("boom")
    assert "forward" not in vars(head) and "_loss_function" not in vars(base)


def test_where_the_fused_head_cannot_stand_in_the_model_runs_as_it_is() -> None:
    adapted_head = lora_model(modules_to_save=["lm_head"])  # the head is a wrapper, not a plain Linear
    with fused_model_loss(adapted_head) as applies:
        assert not applies
        assert adapted_head(**batch()).logits.shape[-1] == VOCAB
    with fused_cross_entropy(False), fused_model_loss(lora_model()) as applies:
        assert not applies


def tokenized_rows() -> datasets.Dataset:
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (8, 10), generator=generator).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def trainer_losses(tmp_path, **changes: object) -> list[float]:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        save_strategy="no",
        **changes,
    )
    trainer = peftkit.integrations.Trainer(model=lora_model(), args=args, train_dataset=tokenized_rows())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_steps_use_the_fused_loss_and_train_as_the_models_own(tmp_path, monkeypatch) -> None:
    calls: list[int] = []
    real = fused_loss_module.linear_cross_entropy
    monkeypatch.setattr(fused_loss_module, "linear_cross_entropy", lambda *a: calls.append(1) or real(*a))
    fused = trainer_losses(tmp_path / "fused")
    assert len(calls) == 4 * 2  # every micro-batch of every step
    with fused_cross_entropy(False):
        plain = trainer_losses(tmp_path / "plain")
    assert len(calls) == 8 and len(fused) == len(plain) == 4
    assert fused == pytest.approx(plain, rel=1e-5)
    smoothed = trainer_losses(tmp_path / "smoothed", label_smoothing_factor=0.1)  # reads the logits
    assert len(calls) == 8 and len(smoothed) == 4
