"""FSDP2 training (``fsdp: true`` under torchrun, 2 gloo CPU processes) against one process.

The same global batch (2 processes × 2 rows vs 1 × 4 rows) gives the same losses within 1e-5 and the
same adapter file within 1e-5 (float sums in another order), as DDP does. Full fine-tuning's weights
agree within 1e-4: Adam divides each update by the root of the gradient's second moment, so for a
weight whose gradient is near zero a 1e-7 difference of the sums moves the update visibly (measured
1.4e-5 at lr 1e-2 after 3 steps, one weight in 2048). On an NF4 base (bfloat16 compute, the default)
the losses agree within 1e-4 and the adapters elementwise within 2·lr (Adam's normalised step of a
near-zero gradient can change sign under bfloat16 rounding; measured max 3.4e-3), 99% within 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.foundation.errors import UsageError
from peftkit.training.loop import train
from peftkit.training.reports import read_metrics
from peftkit.training.sharding import check_shardable
from peftkit.training.tasks import BUILTIN_TASKS
from peftkit.training.train_config import load_config

from helpers.torchrun import run_two_processes


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    task = BUILTIN_TASKS["person-json"]
    train_file, val_file = folder / "train.jsonl", folder / "val.jsonl"
    train_file.write_text("\n".join(task.train.read_text().splitlines()[:16]) + "\n")
    val_file.write_text("\n".join(task.validation.read_text().splitlines()[:2]) + "\n")
    return train_file, val_file


def fsdp_against_one_process(tmp_path: Path, model: Path, rows: tuple[Path, Path], **changes):
    """Train with FSDP2 in 2 processes and in one process; returns both output dirs and the losses."""
    train_file, val_file = rows
    common = {
        "model": str(model),
        "data": str(train_file),
        "validation_data": str(val_file),
        "prompt_template": BUILTIN_TASKS["person-json"].settings["prompt_template"],
        "max_steps": 3,
        "lr": 1e-2,
        "warmup_steps": 1,
        "eval_examples": 2,
        "max_new_tokens": 3,
        "threads": 1,
        **changes,
    }
    single = train(load_config(None, {**common, "output_dir": str(tmp_path / "single"), "batch_size": 4}))
    out = tmp_path / "fsdp"
    stdout = run_two_processes({**common, "output_dir": str(out), "batch_size": 2, "fsdp": True})
    assert "2 process(es)" in stdout and "parameters sharded (FSDP2)" in stdout
    records = read_metrics(out / "metrics.jsonl")
    assert [r["split"] for r in records].count("eval") == 2  # before and after: every process evaluated
    losses = [r["loss"] for r in records if r["split"] == "train"]
    return out, tmp_path / "single", losses, single.losses


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp2_two_processes_match_one_process_with_the_same_global_batch(
    tmp_path, model_dir, rows, method
) -> None:
    out, single, losses, single_losses = fsdp_against_one_process(tmp_path, model_dir, rows, method=method)
    assert losses == pytest.approx(single_losses, abs=1e-5)
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    ours, theirs = load_file(out / weights), load_file(single / weights)
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, atol=1e-5 if method == "lora" else 1e-4, rtol=0)


def test_fsdp2_trains_lora_on_a_4_bit_base_as_one_process_does(tmp_path, rows) -> None:
    pytest.importorskip("bitsandbytes")
    from helpers.tiny_lm import save_tiny_lm

    model = save_tiny_lm(tmp_path / "tiny-128", hidden=128)  # bitsandbytes quantizes blocks of 64
    out, single, losses, single_losses = fsdp_against_one_process(tmp_path, model, rows, quantize="nf4")
    assert losses == pytest.approx(single_losses, abs=1e-4)
    ours, theirs = (
        load_file(out / "adapter_model.safetensors"),
        load_file(single / "adapter_model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    differences = torch.cat([(ours[k] - theirs[k]).abs().flatten() for k in theirs])
    assert differences.max() <= 2 * 1e-2
    assert (differences <= 1e-4).float().mean() >= 0.99


def test_ctrl_c_under_fsdp2_stops_every_process_and_writes_no_partial_checkpoint(
    tmp_path, model_dir, rows
) -> None:
    train_file, _ = rows
    settings = {"model": str(model_dir), "data": str(train_file), "max_steps": 5, "batch_size": 2}
    settings |= {"eval_examples": 0, "threads": 1, "fsdp": True, "output_dir": str(tmp_path / "run")}
    stdout = run_two_processes(settings, ctrl_c_at=2)
    assert "interrupted at step 2; no checkpoint (FSDP2 runs write none yet)" in stdout
    assert not (tmp_path / "run" / "checkpoints").exists()  # rank 0's shards would not be a checkpoint


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ("int8", False, 0, False),
            r"fsdp with quantize='int8': bitsandbytes' 8-bit weights lose their scales",
        ),
        (("none", True, 0, False), r"this method's parameters live outside them \(soft prompts\)"),
        (("none", False, 10, False), r"fsdp does not write checkpoints yet .* set save_every: 0"),
        (("none", False, 0, True), r"fsdp does not write checkpoints yet"),
    ],
)
def test_what_fsdp2_cannot_do_is_refused_in_one_line(arguments, message) -> None:
    with pytest.raises(UsageError, match=message):
        check_shardable(*arguments)
    check_shardable("none", False, 0, False)  # LoRA, no checkpoints: fine
    check_shardable("nf4", False, 0, False)  # QLoRA on 4 bits: fine
