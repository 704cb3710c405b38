"""The bank's device tier against each row computed alone (``PeftModel`` with that adapter set, an
independent path): LoRA of several ranks with rank patterns, DoRA and IA³ side by side in one batch; a
slot written over keeps nothing of its last adapter; growing the slots and their rank keeps the rest.
Tolerance: float32 atol 1e-5."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.ops.multi_lora import RowSlots
from peftkit.serve.adapter_files import read_adapter_files
from peftkit.serve.resident import build_resident
from peftkit.serve.slots import BatchContext, SlotTable

from helpers.tiny_lm import build_model

ATOL = 1e-5
CONFIGS = {
    "lora2": peftkit.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False),
    "lora8": peftkit.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        rank_pattern={"down_proj": 8},
        init_lora_weights=False,
    ),
    "qonly": peftkit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
    "wide": peftkit.LoraConfig(
        r=16, lora_alpha=8, target_modules=["o_proj", "gate_proj"], init_lora_weights=False
    ),
    "dora": peftkit.LoraConfig(
        r=2, use_dora=True, target_modules=["v_proj", "up_proj"], init_lora_weights=False
    ),
    "ia3": peftkit.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[peftkit.PeftModel, dict[str, Path]]:
    """A PeftModel with every adapter of CONFIGS (the reference) and each one's directory."""
    out = tmp_path_factory.mktemp("slots")
    torch.manual_seed(0)
    model = peftkit.wrap(build_model(64), CONFIGS["lora2"], adapter_name="lora2")
    for name, config in CONFIGS.items():
        if name != "lora2":
            model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    model.eval()
    dirs = {}
    for name in CONFIGS:
        model.save_pretrained(out, selected_adapters=[name])
        dirs[name] = out / name
    return model, dirs


def _served(slots: int | None, rank: int | None):
    served = build_model(64).eval()  # the same seeded weights as the reference's base
    context = BatchContext()
    return served, context, SlotTable(served, context, slots, rank)


def _resident(name: str, dirs: dict[str, Path], served):
    return build_resident(name, read_adapter_files(dirs[name], None), served, None)


def _alone(model: peftkit.PeftModel, ids: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for row, name in enumerate(names):
            if name is None:
                with model.disable_adapters():
                    rows.append(model(input_ids=ids[row : row + 1]).logits)
            else:
                model.set_adapter(name)
                rows.append(model(input_ids=ids[row : row + 1]).logits)
    return torch.cat(rows)


def _forward(served, context: BatchContext, table: SlotTable, ids: torch.Tensor, names: list[str | None]):
    context.rows = RowSlots([0 if name is None else table.slot_of(name) for name in names])
    try:
        with torch.no_grad():
            return served(input_ids=ids).logits
    finally:
        context.rows = None


@pytest.mark.parametrize("tokens", [1, 9], ids=["decoding", "prompt"])
def test_lora_dora_and_ia3_in_one_batch_each_equal_the_row_alone(saved, tokens) -> None:
    model, dirs = saved
    served, context, table = _served(slots=6, rank=16)
    for slot, name in enumerate(CONFIGS, start=1):
        table.write(slot, _resident(name, dirs, served))
    names = ["dora", None, "lora8", "ia3", "lora2", "qonly", "wide", "lora8"]
    ids = torch.randint(0, 64, (len(names), tokens), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        _forward(served, context, table, ids, names), _alone(model, ids, names), atol=ATOL, rtol=0
    )


def test_a_slot_written_over_keeps_nothing_of_its_last_adapter(saved) -> None:
    """lora2 adapts every linear layer; qonly written over it adapts q_proj only: the other layers' part of
    slot 1 must be zeros again."""
    model, dirs = saved
    served, context, table = _served(slots=2, rank=8)
    table.write(1, _resident("lora2", dirs, served))
    table.write(2, _resident("lora8", dirs, served))
    table.write(1, _resident("qonly", dirs, served))
    names = ["qonly", "lora8", None]
    ids = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        _forward(served, context, table, ids, names), _alone(model, ids, names), atol=ATOL, rtol=0
    )


def test_without_limits_the_slots_and_their_rank_grow_and_keep_what_they_hold(saved) -> None:
    model, dirs = saved
    served, context, table = _served(slots=None, rank=None)
    assert table.count == 0
    table.write(table.add_slot(), _resident("lora2", dirs, served))
    version = table.version
    table.write(
        table.add_slot(), _resident("lora8", dirs, served)
    )  # rank 8 > the starting 8? equal: no relayout
    table.write(table.add_slot(), _resident("qonly", dirs, served))
    assert table.count == 3 and table.version > version
    names = ["qonly", "lora2", "lora8", None]
    ids = torch.randint(0, 64, (4, 3), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        _forward(served, context, table, ids, names), _alone(model, ids, names), atol=ATOL, rtol=0
    )


def test_a_fixed_table_refuses_a_higher_rank_and_a_slot_beyond_its_count(saved) -> None:
    _, dirs = saved
    served, _, table = _served(slots=1, rank=4)
    assert table.add_slot() is None
    with pytest.raises(ValueError, match="rank 8 above the slots' 4"):
        table.write(1, _resident("lora8", dirs, served))
