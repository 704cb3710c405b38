"""objectives.tokens: the losses of ``peftkit train`` and ``peftkit.integrations`` against plain maths.

References: ``F.cross_entropy(reduction="sum")`` of whole float32 logits, shifted by hand, and the
model's own ``.loss`` (transformers' ``ForCausalLMLoss``) with its gradients; on the tiny Llama of
``tests/helpers/tiny_lm.py`` (tied embeddings), fp32. Tolerances: 1e-6 relative on losses of whole
models, 1e-5 absolute on gradients and on the fused path (chunked float32 sums in another order).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit.objectives import tokens as loss_module
from peftkit.objectives.tokens import (
    forward_logits,
    fused_model_loss,
    head_inputs,
    loss_sum,
    takes_logits_to_keep,
    token_loss_sum,
    token_objective,
)
from peftkit.ops import fused_cross_entropy, plain_output_head

from helpers.tiny_lm import build_model

VOCAB = 60


def batch_with_prompts(vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """Two rows: the first 5 / 3 positions are prompt (no target), the second row is padded at the end."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 10:] = 0
    labels = input_ids.clone()
    labels[0, :5] = labels[1, :3] = -100
    labels[1, 10:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def hand_shifted_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Position t predicts token t+1, row by row, in plain Python over whole float32 logits."""
    total, count = 0.0, 0
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[row, t + 1])
            if target != -100:
                total -= F.log_softmax(logits[row, t].double(), dim=-1)[target].item()
                count += 1
    return total, count


# ------------------------------------------------------------------------------------------ token_loss_sum
def test_causal_token_loss_is_the_shifted_cross_entropy_over_scored_tokens() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 12, VOCAB, generator=generator)
    labels = batch_with_prompts()["labels"]
    loss, count = token_loss_sum(logits, labels, "causal-lm")
    expected, expected_count = hand_shifted_loss(logits, labels)
    assert count.item() == expected_count == 6 + 8
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_causal_token_loss_reads_the_last_positions_of_longer_or_shorter_logits() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 12, VOCAB, generator=generator)
    labels = batch_with_prompts()["labels"]
    expected, _ = token_loss_sum(logits, labels, "causal-lm")
    virtual = torch.randn(2, 3, VOCAB, generator=generator)  # soft-prompt positions in front
    longer, _ = token_loss_sum(torch.cat([virtual, logits], dim=1), labels, "causal-lm")
    kept = logits[:, 2:]  # logits_to_keep=10: still every position before the first target (index 3)
    shorter, count = token_loss_sum(kept, labels, "causal-lm")
    assert count.item() == 14
    assert longer.item() == pytest.approx(expected.item(), rel=1e-6)
    assert shorter.item() == pytest.approx(expected.item(), rel=1e-6)


def test_classification_and_seq2seq_losses_are_plain_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(0)
    class_logits, classes = torch.randn(4, 3, generator=generator), torch.tensor([0, 2, 1, 2])
    loss, count = token_loss_sum(class_logits, classes, "seq-cls")
    assert count.item() == 4
    assert loss.item() == pytest.approx(F.cross_entropy(class_logits, classes, reduction="sum").item())
    logits, labels = torch.randn(2, 5, VOCAB, generator=generator), torch.randint(0, VOCAB, (2, 5))
    labels[1, 3:] = -100
    loss, count = token_loss_sum(logits, labels, "seq2seq-lm")  # no shift: the decoder's own positions
    expected = F.cross_entropy(logits[0], labels[0], reduction="sum") + F.cross_entropy(
        logits[1, :3], labels[1, :3], reduction="sum"
    )
    assert count.item() == 8 and loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------ loss_sum
def wrapped_models():
    yield "full fine-tuning", build_model(VOCAB)
    lora = peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    yield "lora", peftkit.wrap(build_model(VOCAB), lora)
    yield (
        "prompt tuning",
        peftkit.wrap(
            build_model(VOCAB), peftkit.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
        ),
    )
    yield (
        "lora on the head",
        peftkit.wrap(build_model(VOCAB), peftkit.LoraConfig(r=4, target_modules=["lm_head"])),
    )


@pytest.mark.parametrize("case", range(4))
def test_training_loss_of_models_is_unchanged_by_the_fused_path(case: int) -> None:
    name, model = list(wrapped_models())[case]
    model.train()
    batch = batch_with_prompts()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(fused: bool):
        with fused_cross_entropy(fused):
            total, count = loss_sum(model, batch, "causal-lm")
        grads = torch.autograd.grad(total, params)
        return total.detach(), count, grads

    fused, fused_count, fused_grads = loss_and_grads(True)
    whole, whole_count, whole_grads = loss_and_grads(False)
    assert fused_count == whole_count == (batch["labels"][:, 1:] != -100).sum()
    assert torch.allclose(fused, whole, rtol=1e-5, atol=1e-5), name
    for a, b in zip(fused_grads, whole_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    adapted_head = name == "lora on the head"
    assert (plain_output_head(model) is None) == adapted_head


def test_loss_sum_equals_the_hand_computed_loss_of_the_models_logits() -> None:
    model = build_model(VOCAB).eval()
    batch = batch_with_prompts()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total, count = loss_sum(model, batch, "causal-lm")  # fused: the head is a plain Linear
    expected, expected_count = hand_shifted_loss(logits, batch["labels"])
    assert count.item() == expected_count
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_token_objective_is_loss_sum_of_its_task() -> None:
    model = build_model(VOCAB).eval()
    batch = batch_with_prompts()
    with torch.no_grad():
        assert [t.item() for t in token_objective("causal-lm")(model, batch)] == [
            t.item() for t in loss_sum(model, batch, "causal-lm")
        ]


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_loss_from_kept_logits_equals_loss_from_all(method, monkeypatch) -> None:
    """logits_to_keep (the output head only from the first answer token on) changes no loss or gradient."""
    batch = batch_with_prompts()
    assert takes_logits_to_keep(build_model(VOCAB))
    results = []
    for keep in (True, False):
        monkeypatch.setattr(loss_module, "takes_logits_to_keep", lambda model, keep=keep: keep)
        torch.manual_seed(0)
        config = (
            peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            if method == "lora"
            else peftkit.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
        )
        model = peftkit.wrap(build_model(VOCAB), config)
        logits = forward_logits(model, batch, "causal-lm")
        loss, count = token_loss_sum(logits, batch["labels"], "causal-lm")
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((logits.shape[1], loss.item(), count.item(), grads))
    (kept_len, kept_loss, kept_count, kept_grads), (full_len, full_loss, full_count, full_grads) = results
    assert kept_len < full_len  # fewer positions went through the output head
    assert kept_count == full_count == 14
    assert kept_loss == pytest.approx(full_loss, rel=1e-6)
    for kept, full in zip(kept_grads, full_grads, strict=True):
        torch.testing.assert_close(kept, full, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ head_inputs
def test_head_inputs_keeps_the_heads_input_and_gives_its_forward_back() -> None:
    head = nn.Linear(4, 7, bias=False)
    hidden = torch.randn(2, 3, 4)
    with head_inputs(head) as captured:
        out = head(hidden)
        assert out.shape == (2, 3, 0) and captured[-1] is hidden
    assert "forward" not in vars(head) and head(hidden).shape == (2, 3, 7)
    with pytest.raises(RuntimeError, match="boom"), head_inputs(head):
        raise RuntimeError("boom")
    assert "forward" not in vars(head)


# ------------------------------------------------------------------------------------------ fused_model_loss
LORA_VOCAB = 400


def lora_model(**changes: object) -> peftkit.PeftModel:
    torch.manual_seed(0)
    config = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **changes)
    model = peftkit.wrap(build_model(LORA_VOCAB, seed=0), config)
    with torch.no_grad():  # non-zero B: the adapter changes the loss and gets gradients through it
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model


def labelled_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, LORA_VOCAB, (3, 9), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt not scored
    labels[2, 6:] = -100  # padding
    return {"input_ids": input_ids, "labels": labels}


def own_loss_and_grads(model: peftkit.PeftModel, fused: bool, **kwargs: object):
    model.zero_grad(set_to_none=True)
    if fused:
        with fused_model_loss(model) as applies:
            assert applies
            output = model(**labelled_batch(), **kwargs)
        assert output.logits.shape[-1] == 0  # no logits were made
    else:
        output = model(**labelled_batch(), **kwargs)
        assert output.logits.shape[-1] == LORA_VOCAB
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return output.loss.detach(), grads


@pytest.mark.parametrize("num_items", [None, 11, torch.tensor(11)], ids=["mean", "int", "tensor"])
def test_the_fused_loss_equals_the_models_own_loss_and_gradients(num_items) -> None:
    model = lora_model()
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    expected_loss, expected_grads = own_loss_and_grads(model, fused=False, **kwargs)
    loss, grads = own_loss_and_grads(model, fused=True, **kwargs)
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
    assert model(**labelled_batch()).logits.shape[-1] == LORA_VOCAB
    with pytest.raises(RuntimeError, match="boom"), fused_model_loss(model):
        raise RuntimeError("boom")
    assert "forward" not in vars(head) and "_loss_function" not in vars(base)


def test_where_the_fused_head_cannot_stand_in_the_model_runs_as_it_is() -> None:
    adapted_head = lora_model(modules_to_save=["lm_head"])  # the head is a wrapper, not a plain Linear
    with fused_model_loss(adapted_head) as applies:
        assert not applies
        assert adapted_head(**labelled_batch()).logits.shape[-1] == LORA_VOCAB
    with fused_cross_entropy(False), fused_model_loss(lora_model()) as applies:
        assert not applies
