"""Helpers shared by the tests of the model-level methods: soft prompts (prompt tuning, P-tuning, prefix
tuning, and their HF PEFT oracle) and selective fine-tuning."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

import peftkit

from helpers.tiny_models import TINY_MODELS, VOCAB, TinyModel

# The transformers tiny models, each with the task type Hugging Face PEFT needs for it.
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}
PROMPT_MODELS = [tiny for tiny in TINY_MODELS if tiny.name in TASKS]
DECODER_ONLY = ("llama", "gpt2")
N_VIRTUAL = 3
ATOL = 1e-5  # fp32, outputs of magnitude ~1


def make_base(tiny: TinyModel, seed: int = 0) -> nn.Module:
    """A tiny model in eval mode; T5 gets the decoder start token its ``forward`` needs for labels."""
    base = tiny.make(seed)
    if tiny.name == "t5":
        base.config.decoder_start_token_id = 0
    return base


def model_inputs(tiny: TinyModel, padded: bool = False, batch: int = 3) -> dict[str, Tensor]:
    """Seeded inputs with an attention mask; ``padded`` masks the first two positions of row 0."""
    inputs = tiny.inputs(batch=batch)
    mask = torch.ones_like(inputs["input_ids"])
    if padded:
        mask[0, :2] = 0
    inputs["attention_mask"] = mask
    return inputs


def randomize(model: nn.Module, seed: int, scale: float = 0.5) -> None:
    """Seeded random values for every trainable parameter, in name order."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def check_base_frozen_and_prompt_trains(tiny: TinyModel, config: peftkit.AdapterConfig) -> None:
    """Only the prompt (and a SEQ_CLS head copy) trains; one SGD step changes it and no base weight."""
    base = make_base(tiny)
    original = {name: param.detach().clone() for name, param in base.named_parameters()}
    model = peftkit.wrap(base, config)
    trainable = trainable_names(model)
    prompt = {name for name in trainable if name.startswith("model_adapters.default.")}
    assert prompt, "the prompt has no trainable parameter"
    head = {name for name in trainable - prompt if ".copies.default." in name}
    assert trainable == prompt | head, f"unexpected trainable parameters: {trainable - prompt - head}"
    assert bool(head) == (tiny.name == "bert"), "only SEQ_CLS trains a head copy"
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = model_inputs(tiny)
    output = model(**inputs)
    output.logits.float().pow(2).mean().backward()
    optimizer.step()
    changed = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    assert prompt <= changed, f"prompt parameters that did not change: {prompt - changed}"
    assert changed <= trainable, f"frozen parameters changed: {changed - trainable}"
    for name, param in base.named_parameters():
        if name in original:  # the base model's own tensors (a SEQ_CLS head lives on as ``original``)
            assert torch.equal(param, original[name]), f"{name} changed"


def generate_settings(tiny: TinyModel) -> dict[str, Any]:
    """What ``generate`` needs beyond the inputs: T5's decoder start token (the tiny config has none)."""
    return {"decoder_start_token_id": 0} if tiny.name == "t5" else {}


def greedy_reference(model: peftkit.PeftModel, tiny: TinyModel, ids: Tensor, steps: int) -> Tensor:
    """Greedy decoding by full recomputation through ``model.forward`` (no cache, no ``generate``).

    Decoder-only: returns ``ids`` followed by the new tokens; T5: the decoder tokens from the start token.
    """
    with torch.no_grad():
        if tiny.name == "t5":
            out = torch.zeros(ids.shape[0], 1, dtype=torch.long)  # decoder_start_token_id = 0
            for _ in range(steps):
                logits = model(input_ids=ids, decoder_input_ids=out).logits[:, -1]
                out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
            return out
        out = ids
        for _ in range(steps):
            logits = model(input_ids=out).logits[:, -1]
            out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
        return out


def check_generate_matches_recomputation(tiny: TinyModel, config: peftkit.AdapterConfig, **gen: Any) -> None:
    """``generate`` (cache, masks, positions handled by transformers) equals greedy full recomputation."""
    model = peftkit.wrap(make_base(tiny), config)
    randomize(model, seed=3)
    model.eval()
    ids = model_inputs(tiny)["input_ids"]
    steps = 5
    expected = greedy_reference(model, tiny, ids, steps)
    settings = {"max_new_tokens": steps, "do_sample": False, "pad_token_id": 0, **generate_settings(tiny)}
    settings.update(output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, **settings, **gen)
    assert torch.equal(generated.sequences, expected)
    with model.disable_adapters(), torch.no_grad():
        plain = model.generate(input_ids=ids, **settings, **gen)
    first_step_change = (generated.scores[0] - plain.scores[0]).abs().max().item()
    assert first_step_change > 1e-3, "the prompt does not change what is generated"


def check_save_load_round_trip(tiny: TinyModel, config: peftkit.AdapterConfig, tmp_path: Any) -> None:
    """The file holds ``prompt_embeddings`` (and a SEQ_CLS head); loading it reproduces the outputs."""
    from safetensors.torch import load_file

    model = peftkit.wrap(make_base(tiny), config)
    randomize(model, seed=4)
    model.eval()
    inputs = model_inputs(tiny, padded=True)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    head = {"base_model.classifier.weight", "base_model.classifier.bias"} if tiny.name == "bert" else set()
    assert set(tensors) == {"prompt_embeddings"} | head
    loaded = peftkit.load(make_base(tiny), tmp_path).eval()
    with torch.no_grad():
        actual = loaded(**inputs).logits
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)  # an encoder output reloaded as a table
    assert loaded.trainable_parameters()[0] == 0, "a loaded adapter is frozen unless is_trainable=True"
    again = peftkit.load(make_base(tiny), tmp_path, is_trainable=True)
    assert trainable_names(again) >= {"model_adapters.default.embedding.weight"}


def check_not_mergeable(tiny: TinyModel, config: peftkit.AdapterConfig) -> None:
    model = peftkit.wrap(make_base(tiny), config)
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            call()
    assert model.merged_adapters == []
    assert "default" in model.peft_config, "a refused merge_and_unload keeps the adapter"


def check_mixed_batch_refused(tiny: TinyModel, config: peftkit.AdapterConfig) -> None:
    model = peftkit.wrap(make_base(tiny), config)
    with pytest.raises(ValueError, match="layer adapters only"):
        model(**model_inputs(tiny), adapter_names=["default", "__base__", "default"])


def check_disable_gives_base(tiny: TinyModel, config: peftkit.AdapterConfig) -> None:
    base = make_base(tiny)
    inputs = model_inputs(tiny, padded=True)
    with torch.no_grad():
        expected = base(**inputs).logits
    model = peftkit.wrap(base, config)
    with model.disable_adapters(), torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, atol=0, rtol=0)
    with torch.no_grad():
        adapted = model(**inputs).logits
    assert adapted.shape != expected.shape or not torch.allclose(adapted, expected, atol=1e-4)


def toy_task_loss_falls(
    config: peftkit.AdapterConfig, steps: int = 30, lr: float = 0.05
) -> tuple[float, float]:
    """Train on a tiny Llama to answer every prompt with token 5; returns (first loss, last loss).

    The task needs no knowledge, only steering of the next-token distribution, so the loss falls
    within tens of Adam steps (about a second on CPU). The weights are drawn with std 0.2: with the
    default 0.02 the tiny model's outputs barely depend on its inputs, and nothing could steer them.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    base = LlamaForCausalLM(
        LlamaConfig(**shape, num_key_value_heads=2, vocab_size=VOCAB, initializer_range=0.2)
    )
    model = peftkit.wrap(base, config)
    model.train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (8, 6), generator=generator)
    ids[:, -1] = 5
    labels = torch.full_like(ids, -100)
    labels[:, -1] = 5  # only the answer is scored
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def tiny_by_name(name: str) -> TinyModel:
    return next(tiny for tiny in PROMPT_MODELS if tiny.name == name)
