"""Mixed-adapter batches: the stacked LoRA path against each row computed alone.

References: a per-row loop written here (``y_i + s_k·B_k·A_k·x_i``), and, at model level, each row run
alone with its adapter set (the behaviour before the stacked path). Tolerance: float32 atol 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import peftkit
from peftkit.core import layer as layers_module
from peftkit.ops import fast_lora
from peftkit.ops import multi_lora as multi_lora_module
from peftkit.ops.multi_lora import multi_lora, multi_lora_reference, stack_lora

ATOL = 1e-5
IN, OUT = 12, 10


def adapters(ranks: tuple[int, ...], seed: int = 0) -> list[tuple[Tensor, Tensor, float]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(r, IN, generator=generator) * 0.3, torch.randn(OUT, r, generator=generator) * 0.3, 8 / r)
        for r in ranks
    ]


def per_row(x: Tensor, y: Tensor, factors, slot_of_row: list[int]) -> Tensor:
    rows = []
    for i, slot in enumerate(slot_of_row):
        if slot == 0:
            rows.append(y[i])
        else:
            A, B, s = factors[slot - 1]
            rows.append(y[i] + (s * (x[i].float() @ A.T @ B.T)).to(y.dtype))
    return torch.stack(rows)


@pytest.mark.parametrize("tokens", [1, 200], ids=["masked-path", "bmm-path"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-base"])
def test_multi_lora_equals_each_row_alone(tokens: int, dtype: torch.dtype) -> None:
    factors = adapters((2, 4, 3))
    slot_of_row = [2, 0, 1, 3, 2, 0, 1]  # rows of one adapter are not contiguous; two rows have none
    rows = [torch.tensor([i for i, s in enumerate(slot_of_row) if s == k]) for k in (1, 2, 3)]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(len(slot_of_row), tokens, IN, generator=generator).to(dtype)
    y = torch.randn(len(slot_of_row), tokens, OUT, generator=generator).to(dtype)
    stacked = stack_lora(factors, rows, len(slot_of_row))
    assert multi_lora_module.masked_path_applies(tokens, len(factors)) == (
        tokens == 1
    )  # each case takes the path it is named after
    expected = per_row(x, y, factors, slot_of_row)
    atol = ATOL if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(multi_lora(x, y, stacked), expected, atol=atol, rtol=0)
    y_copy = y.clone()
    out = multi_lora(x, y_copy, stacked, in_place=True)
    torch.testing.assert_close(out, expected, atol=atol, rtol=0)
    assert (out.data_ptr() == y_copy.data_ptr()) == (dtype == torch.float32)  # in place where dtypes match
    torch.testing.assert_close(multi_lora_reference(x, y, factors, rows), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("slot_of_row, used", [([2, 0, 2], (1, 2)), ([3, 1, 0], (0, 3)), ([0, 3, 3], (2, 3))])
def test_the_few_token_path_reads_only_the_adapters_in_use(
    slot_of_row: list[int], used: tuple[int, int]
) -> None:
    """Three adapters stacked, some of them used: only the span of used adapters is read (a request
    alone reads its own adapter), and every row still gets its own."""
    factors = adapters((2, 4, 3))
    rows = [
        torch.tensor([i for i, s in enumerate(slot_of_row) if s == k], dtype=torch.long) for k in (1, 2, 3)
    ]
    stacked = stack_lora(factors, rows, len(slot_of_row))
    assert stacked.used_adapters() == used
    all_A, all_B, columns = stacked.side_by_side()
    width = (used[1] - used[0]) * stacked.rank
    assert all_A.shape[1] == all_B.shape[0] == columns.shape[-1] == width
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(len(slot_of_row), 1, IN, generator=generator)
    y = torch.randn(len(slot_of_row), 1, OUT, generator=generator)
    torch.testing.assert_close(
        multi_lora(x, y, stacked), per_row(x, y, factors, slot_of_row), atol=ATOL, rtol=0
    )


def test_stack_lora_refuses_mismatched_groups() -> None:
    with pytest.raises(ValueError, match="one row group per adapter"):
        stack_lora(adapters((2,)), [], 3)


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def three_adapters() -> peftkit.PeftModel:
    model = peftkit.wrap(tiny_llama(), peftkit.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    model.add_adapter("b", peftkit.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    model.add_adapter("c", peftkit.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


NAMES = ["b", "__base__", "default", "c", "b", "default"]


def rows_alone(model: peftkit.PeftModel, ids: Tensor) -> Tensor:
    outputs = []
    for row, name in enumerate(NAMES):
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapters():
                    outputs.append(model(input_ids=ids[row : row + 1]).logits)
            else:
                model.set_adapter(name)
                outputs.append(model(input_ids=ids[row : row + 1]).logits)
    return torch.cat(outputs)


@pytest.mark.parametrize("seq", [3, 300], ids=["masked-path", "bmm-path"])
def test_mixed_batch_forward_equals_rows_alone(seq: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = three_adapters()
    ids = torch.randint(0, 64, (len(NAMES), seq), generator=torch.Generator().manual_seed(4))
    expected = rows_alone(model, ids)
    calls: list[int] = []
    real = layers_module.multi_lora
    monkeypatch.setattr(layers_module, "multi_lora", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=NAMES).logits
    torch.testing.assert_close(mixed, expected, atol=ATOL, rtol=0)
    assert len(calls) == 2 * 7  # every adapted linear layer took the stacked path
    with torch.no_grad(), fast_lora(False):  # switched off: the per-group path, same numbers
        torch.testing.assert_close(
            model(input_ids=ids, adapter_names=NAMES).logits, expected, atol=ATOL, rtol=0
        )
    assert len(calls) == 2 * 7
    mixed_with_graph = model(input_ids=ids, adapter_names=NAMES).logits  # adapters train: per-group path
    assert mixed_with_graph.requires_grad and len(calls) == 2 * 7
    torch.testing.assert_close(mixed_with_graph.detach(), expected, atol=ATOL, rtol=0)


def test_mixed_generate_reuses_the_stacks_and_equals_rows_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    model = three_adapters()
    ids = torch.randint(1, 64, (len(NAMES), 5), generator=torch.Generator().manual_seed(5))
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    built: list[int] = []
    real = layers_module.StackedLora
    monkeypatch.setattr(layers_module, "StackedLora", lambda *a: built.append(1) or real(*a))
    mixed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=NAMES, **kwargs)
    assert len(built) == 2 * 7  # once per layer for the whole generate call, not once per step
    for row, name in enumerate(NAMES):
        one = ids[row : row + 1]
        if name == "__base__":
            with model.disable_adapters():
                alone = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **kwargs)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **kwargs)
        assert torch.equal(mixed[row : row + 1], alone), f"row {row} ({name})"


def test_stacks_serve_every_batch_of_the_same_adapters_until_an_adapter_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server's batch changes rows every few steps: the layers stack each set of adapters once, and
    a changed, replaced or retrained adapter is stacked anew (a stale stack would fail the comparison)."""
    import pickle

    model = three_adapters()
    built: list[int] = []
    real = layers_module.AdapterStacks
    monkeypatch.setattr(layers_module, "AdapterStacks", lambda *a: built.append(1) or real(*a))
    ids = torch.randint(0, 64, (len(NAMES), 3), generator=torch.Generator().manual_seed(6))

    def check(names: list[str]) -> None:
        order = [NAMES.index(name) for name in names]  # rows of ids in the order of names
        with torch.no_grad():
            mixed = model(input_ids=ids[order], adapter_names=names).logits
        torch.testing.assert_close(mixed, rows_alone(model, ids)[order], atol=ATOL, rtol=0)

    check(NAMES)
    assert len(built) == 2 * 7  # one stack per adapted layer
    check(list(reversed(NAMES)))  # other rows, the same adapters
    check(["c", "b", "default", "__base__", "b", "default"])
    check(["b", "__base__", "b", "b", "b", "b"])  # some of the adapters: the layer's one stack serves
    assert len(built) == 2 * 7  # reused
    with torch.no_grad():  # an adapter changed in place: its layer stacks again
        model.model.model.layers[0].self_attn.q_proj.adapters["b"].lora_B.weight.add_(0.5)
    check(NAMES)
    assert len(built) == 2 * 7 + 1
    model.delete_adapter("c")  # replaced by another adapter of the same name and shapes
    model.add_adapter("c", peftkit.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters.c." in name:
                param.normal_(0, 0.3)
    check(NAMES)
    assert pickle.loads(pickle.dumps(model)) is not None  # the stacks' weak references are not pickled


def test_a_routing_made_like_another_takes_over_its_plans_and_equals_rows_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server's next batch: other rows, the same adapters. ``routing(names, like=...)`` reuses what
    the layers found for the last routing (no layer plans again) and gives each row its own adapter."""
    model = three_adapters()
    ids = torch.randint(0, 64, (len(NAMES), 3), generator=torch.Generator().manual_seed(7))
    expected = rows_alone(model, ids)
    planned: list[int] = []
    real = layers_module.AdapterLayer._stack_plan
    monkeypatch.setattr(
        layers_module.AdapterLayer, "_stack_plan", lambda self: planned.append(1) or real(self)
    )
    first = model.routing(NAMES)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, adapter_names=first).logits, expected, atol=ATOL, rtol=0
        )
    assert len(planned) == 2 * 7
    order = [3, 5, 1, 2]  # other rows, fewer of them, one adapter ("b") not used at all
    names = [NAMES[row] for row in order]
    assert "b" in NAMES and "b" not in names
    second = model.routing(names, like=first)
    with torch.no_grad():
        mixed = model(input_ids=ids[order], adapter_names=second).logits
    torch.testing.assert_close(mixed, expected[order], atol=ATOL, rtol=0)
    assert len(planned) == 2 * 7  # taken over

    model.add_adapter("d", peftkit.LoraConfig(r=2, target_modules="all-linear"))  # the plans are stale now
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters.d.lora_B" in name:
                param.normal_(0, 0.3)
    third = model.routing(["d", "b"], like=second)
    with torch.no_grad():
        mixed = model(input_ids=ids[[0, 0]], adapter_names=third).logits  # row 0 under "d", then "b"
        model.set_adapter("d")
        alone = model(input_ids=ids[:1]).logits
    torch.testing.assert_close(mixed[:1], alone, atol=ATOL, rtol=0)  # "d" is not left out
    torch.testing.assert_close(mixed[1:], expected[:1], atol=ATOL, rtol=0)  # NAMES[0] is "b"
    assert len(planned) == 2 * (2 * 7)  # planned again, once per adapted layer
