"""``peftkit train --objective dpo|orpo|simpo``: equal to TRL's DPOTrainer on Hugging Face PEFT, learning,
the reference (precomputed, read back on resume, another base refused), exact resume, Ctrl-C, bad input.

The TRL oracle runs the same tiny Llama (tests/helpers/tiny_lm.py), the same chat-format pairs in the
same order (TRL's sampler made sequential over the rows in peftkit's order), the same starting adapter
(peftkit's seeded LoRA initialisation copied into HF PEFT's), the same optimizer settings (AdamW, constant
learning rate, clipping 1.0). Tolerance on each step's DPO loss: 1e-4, the issue's target (measured
differences are printed by the test on failure).
"""

from __future__ import annotations

import json
import math
import re
import signal
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.cli import main
from peftkit.foundation.errors import UsageError
from peftkit.training.checkpoints import latest_checkpoint
from peftkit.training.loop import train
from peftkit.training.loop.order import BatchOrder
from peftkit.training.tasks import BUILTIN_TASKS
from peftkit.training.train_config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
INSTRUCTION = BUILTIN_TASKS["person-json"].settings["prompt_template"]


def chat_pairs(count: int, start: int = 0) -> list[dict]:
    """``count`` pairs of the bundled preference task in TRL's conversational layout."""
    lines = BUILTIN_TASKS["person-json-pairs"].train.read_text().splitlines()[start : start + count]
    rows = []
    for line in lines:
        row = json.loads(line)
        rows.append(
            {
                "prompt": [{"role": "user", "content": INSTRUCTION.format(prompt=row["prompt"])}],
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pairs")
    return write_jsonl(folder / "train.jsonl", chat_pairs(8)), write_jsonl(
        folder / "val.jsonl", chat_pairs(4, 100)
    )


def settings(tmp_path: Path, model_dir: Path, pair_files: tuple[Path, Path], **changes) -> dict:
    train_file, val_file = pair_files
    base = {
        "model": str(model_dir),
        "objective": "dpo",
        "data": str(train_file),
        "validation_data": str(val_file),
        "output_dir": str(tmp_path / "run"),
        "max_steps": 4,
        "batch_size": 4,
        "lr": 5e-2,
        "warmup_steps": 0,
        "lr_scheduler": "constant",
        "method_options": dict(LORA),
        "eval_examples": 0,
        "threads": 1,
    }
    return {**base, **changes}


def run(tmp_path, model_dir, pair_files, on_step=None, **changes):
    return train(load_config(None, settings(tmp_path, model_dir, pair_files, **changes)), on_step=on_step)


@pytest.mark.parametrize(("batch_size", "rpo_alpha"), [(4, None), (1, 0.5)], ids=["dpo", "dpo-rpo_alpha"])
def test_dpo_losses_equal_trl_dpo_trainer_on_hf_peft(
    tmp_path, model_dir, pair_files, batch_size, rpo_alpha
) -> None:
    """With ``rpo_alpha``: TRL 1.16's ``loss_type=["sigmoid", "sft"], loss_weights=[1, rpo_alpha]``, one
    pair per batch (TRL averages the NLL over a batch's chosen tokens, peftkit per pair: equal then)."""
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    datasets = pytest.importorskip("datasets")
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = run(tmp_path, model_dir, pair_files, batch_size=batch_size, rpo_alpha=rpo_alpha)

    # the adapter train() starts from: its seeded initialisation, made again here
    base, _ = peftkit.models.load_model(str(model_dir))
    set_seed(0)
    start = peftkit.wrap(base, peftkit.LoraConfig(**LORA)).adapter_state_dict("default")
    theirs = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), peft.LoraConfig(**LORA, task_type="CAUSAL_LM")
    )
    peft.set_peft_model_state_dict(theirs, start)
    # peftkit's data order: a seeded permutation per epoch; TRL reads the rows in that order
    order = BatchOrder(8, batch_size, 1, 1, 0, seed=0)
    rows = chat_pairs(8)
    ordered = [rows[i] for step in range(4) for i in order.global_batch(step)]
    sft_term = (
        {} if rpo_alpha is None else {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, rpo_alpha]}
    )
    config = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        max_steps=4,
        per_device_train_batch_size=batch_size,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=0.1,
        max_length=512,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        log_level="error",
        **sft_term,
    )
    oracle = trl.DPOTrainer(
        model=theirs,
        args=config,
        train_dataset=datasets.Dataset.from_list(ordered),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    oracle.train()
    expected = [entry["loss"] for entry in oracle.state.log_history if "loss" in entry]

    assert len(expected) == 4 and abs(expected[-1] - expected[0]) > 1e-2, "TRL's run should train"
    if rpo_alpha is None:
        assert ours.losses[0] == pytest.approx(math.log(2), abs=1e-7)  # policy = reference at step 1
    else:
        assert ours.losses[0] > math.log(2) + 0.1  # plus rpo_alpha x the chosen answer's NLL
    assert ours.losses == pytest.approx(expected, abs=1e-4), (
        f"differences {[a - b for a, b in zip(ours.losses, expected, strict=True)]}"
    )


def evaluated(run_dir: Path, capsys) -> dict[str, float]:
    """What ``peftkit eval RUN`` prints, as numbers."""
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    return {line.split()[0]: float(line.split()[1]) for line in lines if len(line.split()) == 2}


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo"])
def test_each_objective_learns_the_held_out_preferences(
    tmp_path, model_dir, pair_files, objective, capsys
) -> None:
    result = run(tmp_path, model_dir, pair_files, objective=objective, max_steps=12, eval_examples=2)
    assert result.metric == "preference_accuracy"
    assert result.after["reward_margin"] > result.before["reward_margin"]
    assert result.after["loss"] < result.before["loss"]
    if objective == "dpo":
        assert result.before["preference_accuracy"] == 0.5 and result.before["reward_margin"] == 0.0
    summary = json.loads((Path(result.output_dir) / "summary.json").read_text())
    assert summary["metric"] == "preference_accuracy"
    records = [
        json.loads(line) for line in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    train_records = [r for r in records if r["split"] == "train"]
    assert all({"reward_margin", "reward_accuracy"} <= r.keys() for r in train_records)
    assert len(train_records) == 12
    again = evaluated(Path(result.output_dir), capsys)  # DPO: the reference scored anew, adapter off
    for name in ("preference_accuracy", "reward_margin", "loss"):
        assert again[name] == pytest.approx(result.after[name], abs=1e-4), name


def test_ctrl_c_then_resume_continues_exactly(tmp_path, model_dir, pair_files) -> None:
    changes = {"max_steps": 6, "save_every": 3, "method_options": {**LORA, "lora_dropout": 0.1}}
    straight = run(tmp_path / "a", model_dir, pair_files, **changes)

    def press_ctrl_c(step: int, loss: float, model) -> None:
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    stopped = run(tmp_path / "b", model_dir, pair_files, on_step=press_ctrl_c, **changes)
    out = tmp_path / "b" / "run"
    assert stopped.stopped == "interrupted" and latest_checkpoint(out).name == "step-000002"
    assert (out / "reference_log_probs.safetensors").is_file()
    resumed = run(tmp_path / "b", model_dir, pair_files, resume=True, **changes)
    assert resumed.first_step == 2
    assert stopped.losses + resumed.losses == straight.losses  # bit for bit, dropout included
    for (name, a), (_, b) in zip(
        straight.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def test_reference_adapter_is_the_start_and_another_base_is_refused(
    tmp_path, model_dir, pair_files, capsys
) -> None:
    from helpers.tiny_lm import save_tiny_lm

    sft_data = tmp_path / "sft.jsonl"
    lines = BUILTIN_TASKS["person-json"].train.read_text().splitlines()[:16]
    sft_data.write_text("\n".join(lines) + "\n")
    sft = train(
        load_config(
            None,
            {
                "model": str(model_dir),
                "data": str(sft_data),
                "validation_split": 0.25,
                "prompt_template": INSTRUCTION,
                "output_dir": str(tmp_path / "sft"),
                "max_steps": 3,
                "batch_size": 4,
                "lr": 5e-2,
                "eval_examples": 0,
                "threads": 1,
                "method_options": dict(LORA),
            },
        )
    )
    trained = {k: v.clone() for k, v in sft.model.adapter_state_dict("default").items()}
    dpo = run(
        tmp_path, model_dir, pair_files, reference=str(tmp_path / "sft"), method_options={}, max_steps=2
    )
    assert dpo.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    assert dpo.before["preference_accuracy"] == 0.5
    moved = dpo.model.adapter_state_dict("default")
    assert any(not torch.equal(trained[k], moved[k]) for k in trained)
    again = evaluated(Path(dpo.output_dir), capsys)  # the reference adapter loaded beside the trained one
    assert again["reward_margin"] == pytest.approx(dpo.after["reward_margin"], abs=1e-4)

    other = save_tiny_lm(tmp_path / "other-base", seed=5)
    with pytest.raises(UsageError, match=r"was trained on .* not on this run.s model"):
        run(tmp_path / "x", other, pair_files, reference=str(tmp_path / "sft"), method_options={})
    with pytest.raises(UsageError, match="leave out the method options"):
        run(tmp_path / "y", model_dir, pair_files, reference=str(tmp_path / "sft"))


def test_bad_preference_input_is_one_line(tmp_path, model_dir, pair_files, capsys) -> None:
    no_rejected = write_jsonl(
        tmp_path / "no_rejected.jsonl",
        [{k: v for k, v in r.items() if k != "rejected"} for r in chat_pairs(4)],
    )
    same = chat_pairs(4)
    same[2]["rejected"] = same[2]["chosen"]
    identical = write_jsonl(tmp_path / "identical.jsonl", same)
    cases = [
        (["--data", str(no_rejected)], "column 'rejected' not found"),
        (["--data", str(identical)], "row 3 of .*identical.jsonl: chosen and rejected are the same answer"),
        (["--simpo-gamma", "0.3"], "simpo_gamma .* is an option of objective simpo, not of 'dpo'"),
        (["--objective", "orpo", "--reference", str(tmp_path)], "reference .* is an option of objective dpo"),
        (["--objective", "sft", "--beta", "0.2"], "beta .* is an option of objective dpo, orpo or simpo"),
        (["--reference", str(tmp_path / "nowhere")], "is not an adapter directory"),
        (["--packing"], "packing of preference pairs is not built yet"),
    ]
    common = ["train", "--model", str(model_dir), "--objective", "dpo", "--threads", "1", "--output-dir"]
    for number, (flags, message) in enumerate(cases):
        out = tmp_path / f"out-{number}"
        code = main([*common, str(out), "--data", str(pair_files[0]), *flags])
        err = capsys.readouterr().err.strip()
        assert code == 2, flags
        assert len(err.splitlines()) == 1, err
        assert re.search(message, err), (flags, err)
        assert not out.exists(), "nothing is written before the input is checked"
