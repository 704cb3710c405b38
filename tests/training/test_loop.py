"""peftkit.training.loop: learning, outputs, exact resume, Ctrl-C, NaN stop, accumulation, DDP, tasks.

Tiny 2-layer models with a tiny BPE tokenizer (tests/helpers/tiny_lm.py) make a step take milliseconds; one
slow test runs the default job on the real SmolLM2-135M-Instruct with fewer steps.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import peftkit
from peftkit.cli import main
from peftkit.foundation.errors import UsageError
from peftkit.training.checkpoints import latest_checkpoint
from peftkit.training.loop import train
from peftkit.training.method_choice import METHOD_NAMES
from peftkit.training.tasks import BUILTIN_TASKS
from peftkit.training.train_config import load_config

from helpers.tiny_lm import build_model, build_tokenizer, save_tiny_classifier
from helpers.torchrun import run_two_processes

REPO = Path(__file__).resolve().parents[2]
DIALOGSUM = REPO.parent / "shared" / "data" / "dialogsum"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """48 training and 8 held-out rows of the bundled task."""
    folder = tmp_path_factory.mktemp("data")
    task = BUILTIN_TASKS["person-json"]
    train_file, val_file = folder / "train.jsonl", folder / "val.jsonl"
    train_file.write_text("\n".join(task.train.read_text().splitlines()[:48]) + "\n")
    val_file.write_text("\n".join(task.validation.read_text().splitlines()[:8]) + "\n")
    return train_file, val_file


def settings(tmp_path: Path, model_dir: Path, small_data: tuple[Path, Path], **changes) -> dict:
    train_file, val_file = small_data
    base = {
        "model": str(model_dir),
        "data": str(train_file),
        "validation_data": str(val_file),
        "prompt_template": BUILTIN_TASKS["person-json"].settings["prompt_template"],
        "output_dir": str(tmp_path / "run"),
        "max_steps": 6,
        "batch_size": 4,
        "lr": 1e-2,
        "warmup_steps": 1,
        "eval_examples": 2,
        "max_new_tokens": 4,
        "threads": 1,  # fixed, so that float sums (and exact resume) do not depend on the machine's load
    }
    return {**base, **changes}


def config_for(tmp_path, model_dir, small_data, **changes):
    return load_config(None, settings(tmp_path, model_dir, small_data, **changes))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_modes(directory: Path) -> set[int]:
    """The permission bits of every file under ``directory``."""
    return {path.stat().st_mode & 0o777 for path in directory.rglob("*") if path.is_file()}


def train_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------- learning and outputs
def test_training_learns_and_writes_every_output(tmp_path, model_dir, small_data, capsys) -> None:
    config = config_for(tmp_path, model_dir, small_data, max_steps=24)
    result = train(config)
    assert result.stopped is None and result.steps == 24 and len(result.losses) == 24
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4 - 0.05  # it learns (a random tiny base)
    assert result.after["loss"] < result.before["loss"]

    run = Path(config.output_dir)
    records = train_records(run)
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 25))
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 24]
    assert [r["loss"] for r in records if r["split"] == "train"] == pytest.approx(result.losses)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recorded = yaml.safe_load((run / "train_config.yaml").read_text())
    assert recorded["method_options"] == {"r": 8, "lora_alpha": 16}  # the method's defaults, not {}
    # target_modules was not given: the model's attention projections, named in the adapter's file
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable"] == 4 * 2 * 8 * (32 + 32) - 2 * 2 * 8 * (32 - 16)  # q,o: 32->32; k,v: 32->16
    assert summary["before"]["exact_match"] == 0.0 and "rougeL" in summary["after"]
    if _has_tensorboard():
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    out = capsys.readouterr().out
    assert "model.layers.*.self_attn.q_proj" in out  # the trainable-parameter table
    assert "summary" in out and "peftkit generate" in out
    assert "8 held-out rows (loss on all, the first 2 also by generation)" in out

    # the adapter is Hugging Face PEFT's format: HF PEFT loads it and computes the same logits
    from peft import PeftModel as HfPeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        ours = result.model(input_ids=ids).logits
        theirs = HfPeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), run)(
            input_ids=ids
        ).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path, model_dir, small_data) -> None:
    one = train(
        config_for(tmp_path / "a", model_dir, small_data, batch_size=4, grad_accum=1, eval_examples=0)
    )
    two = train(
        config_for(tmp_path / "b", model_dir, small_data, batch_size=2, grad_accum=2, eval_examples=0)
    )
    assert two.losses == pytest.approx(one.losses, abs=1e-5)
    _assert_same_adapters(one.model, two.model, atol=1e-5)


def test_padding_free_batches_train_as_the_padded_ones(tmp_path, model_dir, small_data, capsys) -> None:
    """The same examples in each step, laid end to end instead of padded: the same losses and adapters
    (float32, to 1e-5), no padding computed, and the run says so."""
    padded = train(config_for(tmp_path / "a", model_dir, small_data, packing=False, eval_examples=0))
    capsys.readouterr()
    free = train(config_for(tmp_path / "b", model_dir, small_data, padding_free=True, eval_examples=0))
    said = "".join(capsys.readouterr())  # out and err
    assert "padding-free: each batch's examples end to end (padded batches would be" in said
    assert "48 examples, each batch's laid end to end" in said  # the summary
    assert free.padding_tokens == 0 < padded.padding_tokens
    assert free.tokens == padded.tokens and free.steps == padded.steps == 6
    assert free.losses == pytest.approx(padded.losses, abs=1e-5)
    _assert_same_adapters(padded.model, free.model, atol=1e-5)


@pytest.mark.parametrize(
    "optimization",
    [
        {},
        {"optimizer": "lora-plus", "loraplus_lr_ratio": 4.0, "lr_scheduler": "linear"},
        {"packing": True, "batch_size": 1},  # 48 examples in about 10 packed rows
        {"padding_free": True},
    ],
    ids=["adamw-cosine", "lora-plus-linear", "packed", "padding-free"],
)
def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(
    tmp_path, model_dir, small_data, optimization
) -> None:
    changes = {
        "max_steps": 8,
        "save_every": 4,
        "eval_examples": 0,
        "method_options": {"lora_dropout": 0.1},
        **optimization,
    }
    straight = train(config_for(tmp_path / "a", model_dir, small_data, **changes))

    def press_ctrl_c(step: int, loss: float, model) -> None:
        if step == 3:
            signal.raise_signal(signal.SIGINT)  # the real handler: finish the step, save, stop

    config = config_for(tmp_path / "b", model_dir, small_data, **changes)
    stopped = train(config, on_step=press_ctrl_c)
    assert stopped.stopped == "interrupted" and stopped.steps == 3
    assert latest_checkpoint(Path(config.output_dir)).name == "step-000003"
    assert not (Path(config.output_dir) / "adapter_model.safetensors").exists()
    saved = Path(config.output_dir) / "train_config.yaml"  # as older peftkit wrote it: options as given
    saved.write_text(
        yaml.safe_dump({**yaml.safe_load(saved.read_text()), "method_options": changes["method_options"]})
    )

    resumed = train(config.replace(resume=True))
    assert resumed.first_step == 3
    assert stopped.losses + resumed.losses == straight.losses  # bit for bit, dropout included
    _assert_same_adapters(straight.model, resumed.model, atol=0)
    steps = [r["step"] for r in train_records(Path(config.output_dir)) if r["split"] == "train"]
    assert steps == list(range(1, 9))


def test_resume_refuses_changed_settings_and_missing_checkpoints(tmp_path, model_dir, small_data) -> None:
    config = config_for(tmp_path, model_dir, small_data, max_steps=2, eval_examples=0)
    with pytest.raises(UsageError, match="no checkpoint"):
        train(config.replace(resume=True))
    train(config.replace(save_every=2))
    with pytest.raises(UsageError, match=r"lr was 0\.01 .* but is 0\.02 now"):
        train(config.replace(resume=True, lr=2e-2, max_steps=4))
    with pytest.raises(UsageError, match=r"method_options was \{'r': 8, .* but is \{'r': 4, "):
        train(config.replace(resume=True, method_options={"r": 4}))
    train(config.replace(resume=True, max_steps=4, method_options={"r": 8}))  # the default, written out


def test_non_finite_loss_stops_before_the_update_and_keeps_the_last_checkpoint(
    tmp_path, model_dir, small_data, capsys
) -> None:
    def poison(step: int, loss: float, model) -> None:
        if step == 3:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    config = config_for(tmp_path, model_dir, small_data, max_steps=6, save_every=2, eval_examples=0)
    result = train(config, on_step=poison)
    assert result.stopped == "non-finite" and result.steps == 3
    err = capsys.readouterr().err
    assert "the loss is nan" in err and "at step 4" in err and "step-000002" in err
    run = Path(config.output_dir)
    assert latest_checkpoint(run).name == "step-000002"
    assert all(
        torch.isfinite(t).all()
        for t in load_file(run / "checkpoints/step-000002/trainable.safetensors").values()
    )
    assert not (run / "adapter_model.safetensors").exists()


def test_gradient_checkpointing_same_losses_and_bf16_close(tmp_path, model_dir, small_data) -> None:
    plain = train(config_for(tmp_path / "a", model_dir, small_data, max_steps=3, eval_examples=0))
    checkpointed = train(
        config_for(
            tmp_path / "b", model_dir, small_data, max_steps=3, eval_examples=0, gradient_checkpointing=True
        )
    )
    assert checkpointed.losses == pytest.approx(plain.losses, abs=1e-5)
    bf16 = train(config_for(tmp_path / "c", model_dir, small_data, max_steps=3, eval_examples=0, bf16=True))
    assert bf16.losses == pytest.approx(plain.losses, abs=0.05)
    half = config_for(tmp_path / "d", model_dir, small_data, max_steps=3, eval_examples=0, dtype="bfloat16")
    half_base = train(half)
    assert half_base.losses == pytest.approx(plain.losses, abs=0.05)
    assert all(p.dtype == torch.float32 for p in half_base.model.parameters() if p.requires_grad)


def test_full_finetuning_writes_a_plain_model(tmp_path, model_dir, small_data) -> None:
    from transformers import AutoModelForCausalLM

    config = config_for(
        tmp_path, model_dir, small_data, method="full", max_steps=2, eval_examples=0, save_every=2
    )
    result = train(config)
    assert result.trainable == result.total
    run = Path(config.output_dir)
    # every file readable as the umask allows (safetensors alone writes 0600)
    assert file_modes(run) == {0o666 & ~current_umask()}, sorted(run.rglob("*"))
    assert (run / "model.safetensors").is_file() and (
        run / "checkpoints/step-000002/trainable.safetensors"
    ).is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(config.output_dir)
    ids = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)


NOT_MERGEABLE = ("adapter", "prompt", "p-tuning", "prefix")  # README's method table


@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if m not in ("lora", "full")])
def test_every_method_trains_and_reloads(tmp_path, model_dir, small_data, method: str, capsys) -> None:
    config = config_for(tmp_path, model_dir, small_data, method=method, max_steps=2, eval_examples=0)
    result = train(config)
    assert result.stopped is None and all(math.isfinite(loss) for loss in result.losses)
    assert 0 < result.trainable < result.total
    fresh = peftkit.load(_base(model_dir), config.output_dir)
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(
            fresh(input_ids=ids).logits, result.model(input_ids=ids).logits, atol=1e-5, rtol=0
        )
    # the commands the run suggests are the ones that work for its method
    try_it = capsys.readouterr().out.split("Try it:\n", 1)[1]
    commands = [
        shlex.split(line, comments=True) for line in try_it.splitlines() if line.startswith("  peftkit ")
    ]
    assert [c[1] for c in commands] == ["generate", "eval"] + ([] if method in NOT_MERGEABLE else ["merge"])
    for command in commands:
        assert main([*command[1:], *(["--max-new-tokens", "4"] if command[1] == "generate" else [])]) == 0


def test_bad_input_is_found_before_anything_is_written(tmp_path, model_dir, small_data) -> None:
    config = config_for(tmp_path, model_dir, small_data)
    for bad, message in [
        ({"model": str(tmp_path / "nope")}, "cannot load model"),
        ({"data": str(tmp_path / "none.jsonl")}, "data file not found"),
        ({"method": "lora", "method_options": {"r": 0}}, "r=0 must be a positive integer"),
        ({"method_options": {"target_modules": ["nothing"]}}, "matched no module"),
    ]:
        with pytest.raises(UsageError, match=message):
            train(config.replace(**bad))
        assert not Path(config.output_dir).exists()


# ------------------------------------------------------------------------------------------ other tasks
def test_seq2seq_task_trains_and_scores_generation(tmp_path, small_data) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = build_tokenizer(plain=True)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(
        T5Config(
            d_model=32,
            d_ff=64,
            d_kv=8,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            vocab_size=len(tokenizer),
            decoder_start_token_id=tokenizer.pad_token_id,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    model.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    config = config_for(
        tmp_path,
        tmp_path / "t5",
        small_data,
        task="seq2seq-lm",
        max_steps=4,
        method_options={"target_modules": ["q", "v"]},
    )
    result = train(config)
    assert result.after["loss"] < result.before["loss"]
    assert {"exact_match", "rouge1", "rouge2", "rougeL"} <= set(result.after)


def test_sequence_classification_task_reports_accuracy(tmp_path) -> None:
    save_tiny_classifier(tmp_path / "cls")
    rows = [
        {"text": f"{word} {i}", "label": "pos" if word == "good" else "neg"}
        for i in range(16)
        for word in ("good", "bad")
    ]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = load_config(
        None,
        {
            "model": str(tmp_path / "cls"),
            "task": "seq-cls",
            "data": str(data),
            "prompt_column": "text",
            "completion_column": "label",
            "validation_split": 0.25,
            "output_dir": str(tmp_path / "run"),
            "max_steps": 30,
            "batch_size": 8,
            "lr": 1e-2,
            "method_options": {"target_modules": ["q_proj", "v_proj"]},
            "threads": 1,
        },
    )
    result = train(settings)
    assert result.metric == "accuracy"
    assert result.after["accuracy"] == 1.0  # "good"/"bad" is separable
    three = tmp_path / "three.jsonl"
    three.write_text("".join(json.dumps({"text": f"t{i}", "label": f"l{i % 3}"}) + "\n" for i in range(12)))
    three_labels = train(settings.replace(data=str(three), output_dir=str(tmp_path / "run3"), max_steps=1))
    assert three_labels.model.config.id2label == {0: "l0", 1: "l1", 2: "l2"}  # a new head, one row per label
    assert three_labels.model.score.copies["default"].weight.shape == (3, 32)


@pytest.mark.skipif(not DIALOGSUM.is_dir(), reason="shared/data/dialogsum not present")
def test_dialogsum_trains_as_summarization(tmp_path, model_dir) -> None:
    config = load_config(
        REPO / "examples" / "dialogsum.yaml",
        {
            "model": str(model_dir),
            "data": str(DIALOGSUM / "dev.jsonl"),
            "validation_data": str(DIALOGSUM / "test.jsonl"),
            "output_dir": str(tmp_path / "run"),
            "max_steps": 2,
            "eval_examples": 2,
            "max_new_tokens": 4,
            "eval_every": 0,
            "save_every": 0,
            "max_length": 256,
        },
    )
    result = train(config)
    assert result.metric == "rougeL" and result.stopped is None
    assert {"rouge1", "rouge2", "rougeL", "loss"} <= set(result.after)


# ------------------------------------------------------------------------------------------ distributed
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(
    tmp_path, model_dir, small_data
) -> None:
    common = settings(tmp_path, model_dir, small_data, max_steps=4, eval_examples=0)
    single = train(load_config(None, {**common, "output_dir": str(tmp_path / "single"), "batch_size": 4}))
    ddp_out = tmp_path / "ddp"
    stdout = run_two_processes({**common, "output_dir": str(ddp_out), "batch_size": 2})
    assert "2 process(es)" in stdout
    rank0, rank1 = (load_file(ddp_out / f"rank-{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # replicas identical
    ddp_losses = [r["loss"] for r in train_records(ddp_out) if r["split"] == "train"]
    assert ddp_losses == pytest.approx(single.losses, abs=1e-5)
    ours = {n: p for n, p in single.model.named_parameters() if p.requires_grad}
    for name, tensor in rank0.items():
        torch.testing.assert_close(tensor, ours[name].detach(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ the default job
@pytest.mark.slow
def test_default_job_on_smollm2_learns_the_bundled_task(tmp_path) -> None:
    """``peftkit train`` with its defaults (fewer steps and scored rows) on the real model."""
    torch.set_num_threads(2)
    from peftkit.cli import main

    code = main(
        ["train", "--max-steps", "24", "--eval-examples", "16", "--output-dir", str(tmp_path / "run")]
    )
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metric"] == "exact_match"
    assert summary["before"]["exact_match"] <= 0.1
    assert summary["after"]["exact_match"] >= 0.5
    assert summary["trainable"] == 30 * (2 * 8 * (576 + 576) + 2 * 8 * (576 + 192))


# ------------------------------------------------------------------------------------------ helpers
def _base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _assert_same_adapters(a, b, atol: float) -> None:
    pa = {n: p for n, p in a.named_parameters() if p.requires_grad}
    pb = {n: p for n, p in b.named_parameters() if p.requires_grad}
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], atol=atol, rtol=0)


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_tiny_model_builder_matches_its_tokenizer() -> None:
    tokenizer = build_tokenizer()
    assert build_model(len(tokenizer)).get_input_embeddings().num_embeddings == len(tokenizer)
