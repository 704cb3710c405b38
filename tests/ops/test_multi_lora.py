"""Mixed-adapter batches: the stacked LoRA path against each row computed alone.

References: a per-row loop written here (``y_i + s_k·B_k·A_k·x_i``), and, at model level, each row run
alone with its adapter set (the behaviour before the stacked path). Tolerance: float32 atol 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import peftkit
from peftkit.model import routing as routing_module
from peftkit.ops import fast_lora
from peftkit.ops import multi_lora as multi_lora_module
from peftkit.ops.multi_lora import LoraStacks, RowSlots, multi_lora, multi_lora_reference

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
    stacks, slots = LoraStacks.from_factors(factors), RowSlots(slot_of_row)
    assert multi_lora_module.masked_path_applies(tokens, len(factors)) == (
        tokens == 1
    )  # each case takes the path it is named after
    expected = per_row(x, y, factors, slot_of_row)
    atol = ATOL if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(multi_lora(x, y, stacks, slots), expected, atol=atol, rtol=0)
    y_copy = y.clone()
    out = multi_lora(x, y_copy, stacks, slots, in_place=True)
    torch.testing.assert_close(out, expected, atol=atol, rtol=0)
    assert (out.data_ptr() == y_copy.data_ptr()) == (dtype == torch.float32)  # in place where dtypes match
    torch.testing.assert_close(multi_lora_reference(x, y, factors, rows), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("slot_of_row, used", [([2, 0, 2], (2, 3)), ([3, 1, 0], (1, 4)), ([0, 3, 3], (3, 4))])
def test_the_few_token_path_reads_only_the_slots_in_use(
    slot_of_row: list[int], used: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three adapters stacked, some of them used: only the span of used slots is read (a request
    alone reads its own adapter), and every row still gets its own."""
    factors = adapters((2, 4, 3))
    stacks, slots = LoraStacks.from_factors(factors), RowSlots(slot_of_row)
    assert (slots.first, slots.stop) == used
    widths = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: widths.append(b.shape[1]) or real_mm(a, b))
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(len(slot_of_row), 1, IN, generator=generator)
    y = torch.randn(len(slot_of_row), 1, OUT, generator=generator)
    out = multi_lora(x, y, stacks, slots)
    monkeypatch.undo()
    assert widths == [(used[1] - used[0]) * stacks.rank]  # the A columns read: the used slots' only
    torch.testing.assert_close(out, per_row(x, y, factors, slot_of_row), atol=ATOL, rtol=0)


def test_stacks_write_clear_and_resize_keep_each_slot_its_own() -> None:
    """A slot written over holds only the new adapter (a smaller rank leaves no trace of the old one), a
    cleared slot adds nothing, and growing the stacks keeps every slot's contents."""
    factors = adapters((4, 2, 3), seed=5)
    stacks = LoraStacks(3, 4, IN, OUT, torch.float32)
    stacks.write(1, *factors[0])
    stacks.write(2, *factors[2])
    stacks.write(1, *factors[1])  # rank 2 over rank 4
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, IN, generator=generator)
    y = torch.randn(3, 5, OUT, generator=generator)
    expected = per_row(x, y, [factors[1], factors[2]], [1, 2, 0])
    torch.testing.assert_close(multi_lora(x, y, stacks, RowSlots([1, 2, 0])), expected, atol=ATOL, rtol=0)
    grown = stacks.resized(5, 8)
    assert (grown.slots, grown.rank) == (5, 8)
    torch.testing.assert_close(multi_lora(x, y, grown, RowSlots([1, 2, 0])), expected, atol=ATOL, rtol=0)
    grown.clear(2)
    torch.testing.assert_close(multi_lora(x, y, grown, RowSlots([0, 2, 0])), y, atol=0, rtol=0)
    with pytest.raises(ValueError, match="rank 8 of at most 4"):
        stacks.write(1, torch.zeros(8, IN), torch.zeros(OUT, 8), 1.0)


def test_row_slots_from_groups_and_no_adapter_at_all() -> None:
    slots = RowSlots.from_groups([torch.tensor([2]), torch.tensor([0, 3])], 5)
    assert slots.slot.tolist() == [2, 0, 1, 2, 0] and (slots.first, slots.stop) == (1, 3)
    assert slots.rows_of(2).tolist() == [0, 3]
    none = RowSlots([0, 0])
    y = torch.randn(2, 1, OUT)
    assert (
        not none.adapted
        and multi_lora(torch.randn(2, 1, IN), y, LoraStacks.from_factors(adapters((2,))), none) is y
    )


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
    real = routing_module.multi_lora
    monkeypatch.setattr(routing_module, "multi_lora", lambda *a, **k: calls.append(1) or real(*a, **k))
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
    real = routing_module.LoraStacks.from_factors
    monkeypatch.setattr(routing_module.LoraStacks, "from_factors", lambda f: built.append(1) or real(f))
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


def test_a_layer_with_lora_and_other_adapters_stacks_the_lora_ones_and_gathers_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DoRA and IA³ next to LoRA in one mixed batch: the LoRA rows take the stacked path, the others
    their own adapter on their own rows; every row equals itself alone."""
    model = three_adapters()
    model.add_adapter("dora", peftkit.LoraConfig(r=2, use_dora=True, target_modules=["q_proj", "v_proj"]))
    model.add_adapter(
        "ia3", peftkit.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters.dora." in name or ".adapters.ia3." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    names = ["dora", "b", "__base__", "ia3", "c", "dora"]
    ids = torch.randint(0, 64, (len(names), 3), generator=torch.Generator().manual_seed(9))
    stacked: list[int] = []
    real = routing_module.LoraStacks.from_factors
    monkeypatch.setattr(
        routing_module.LoraStacks, "from_factors", lambda f: stacked.append(len(f)) or real(f)
    )
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapters():
                    alone = model(input_ids=ids[row : row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, atol=ATOL, rtol=0)
    assert stacked and max(stacked) == 2  # b and c stack; DoRA and IA³ do not


def test_a_routing_reused_over_calls_stacks_once_and_equals_rows_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``model.routing(names)`` passed to several calls: the layers stack on the first call only."""
    model = three_adapters()
    built: list[int] = []
    real = routing_module.LoraStacks.from_factors
    monkeypatch.setattr(routing_module.LoraStacks, "from_factors", lambda f: built.append(1) or real(f))
    routing = model.routing(NAMES)
    for seed in range(3):
        ids = torch.randint(0, 64, (len(NAMES), 3), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            mixed = model(input_ids=ids, adapter_names=routing).logits
        torch.testing.assert_close(mixed, rows_alone(model, ids), atol=ATOL, rtol=0)
    assert len(built) == 2 * 7
