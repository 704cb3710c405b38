"""Real data: peftkit padded and packed against TRL's SFTTrainer + Hugging Face PEFT on DialogSum.

    python benchmarks/real_data.py --data-dir /path/to/dialogsum \\
        --examples 96 --heldout 40 --rounds 2

DialogSum's dev dialogues (a seeded choice of ``--examples``), as ``examples/dialogsum.yaml`` prepares
them (SmolLM2-135M-Instruct's chat template, max_length 768), train LoRA r16 all-linear (alpha 32,
dropout 0, float32) for one epoch: every variant sees the same examples, so the same real tokens, with
AdamW at a constant learning rate of 1e-3, gradient clipping at 1.0, seed 0, the loss per answer token:

- **peftkit padded**: ``peftkit train --no-packing``, 4 examples per step padded to the longest;
- **peftkit packed**: ``peftkit train --packing``, 1 packed row of up to 768 tokens per step (each
  example attending only to itself: ``objectives.packed``);
- **peftkit padding-free**: ``peftkit train --padding-free``, 4 examples per step laid end to end (the
  padded run's batches, each example attending only to itself);
- **TRL padding-free**: ``SFTConfig(padding_free=True)``, 4 examples per step laid end to end (no
  padding; transformers builds the block-diagonal mask from the restarting position ids);
- **TRL packed (bfd)**: ``SFTConfig(packing=True, packing_strategy="bfd")``, 1 packed row per step
  (padding-free too);
- **TRL padded**: neither, 4 examples per step padded.

TRL trains on the very token rows peftkit prepares (a pre-tokenized data set with ``input_ids`` and
``labels``). Each variant runs in its own process (so its peak resident memory is its own), the
variants in a rotating order each round; tokens/s is real (non-padding) tokens over the training time
(peftkit: its steps; TRL: ``on_train_begin`` to ``on_train_end``), medians over the rounds. The
held-out loss is the mean loss per answer token of the first ``--heldout`` DialogSum test dialogues,
each scored alone by the same code for every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, table

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 768
LR = 1e-3
PADDED_BATCH = 4  # examples per step, padded or padding-free
PACKED_BATCH = 1  # packed rows of up to MAX_LENGTH tokens per step (about 3 DialogSum examples)
VARIANTS = {
    "peftkit padded": "peftkit-padded",
    "peftkit packed": "peftkit-packed",
    "peftkit padding-free": "peftkit-padding-free",
    "TRL padding-free": "trl-padding-free",
    "TRL packed (bfd)": "trl-packed",
    "TRL padded": "trl-padded",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "dialogsum")
    parser.add_argument("--examples", type=int, default=96, help="training dialogues (a multiple of 4)")
    parser.add_argument("--heldout", type=int, default=40, help="test dialogues scored by held-out loss")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=list(VARIANTS.values()), help=argparse.SUPPRESS)
    parser.add_argument("--train-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.train_file, args.data_dir, args.heldout)))
        return
    if args.examples % PADDED_BATCH:
        parser.error(f"--examples must be a multiple of {PADDED_BATCH}")
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.jsonl"
        rows = (args.data_dir / "dev.jsonl").read_text().splitlines()
        train_file.write_text("\n".join(random.Random(0).sample(rows, args.examples)) + "\n")
        results = run_rounds(args, train_file)
    report(args, results)


def run_rounds(args: argparse.Namespace, train_file: Path) -> dict[str, list[dict]]:
    """Every variant once per round, each in its own process, in an order that rotates each round."""
    names = list(VARIANTS)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for index in range(args.rounds):
        shift = index % len(names)
        for name in [*names[shift:], *names[:shift]]:
            command = [
                sys.executable,
                __file__,
                "--worker",
                VARIANTS[name],
                "--train-file",
                str(train_file),
                "--data-dir",
                str(args.data_dir),
                "--heldout",
                str(args.heldout),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  round {index + 1}/{args.rounds}: {name}: {results[name][-1]}", flush=True)
    return results


def report(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    rows = []
    for name, runs in results.items():
        rows.append(
            [
                name,
                f"{runs[0]['real_tokens']:,}",
                f"{runs[0]['padding_tokens']:,}",
                f"{runs[0]['steps']}",
                f"{median(name, 'tokens_per_s'):.0f}",
                " / ".join(f"{r['tokens_per_s']:.0f}" for r in runs),
                f"{median(name, 'peak_rss') / 2**20:.0f}",
                f"{runs[-1]['heldout_loss']:.4f}",
            ]
        )
    headers = ["variant", "real tokens", "padding", "steps", "tokens/s", "rounds", "peak RSS MiB", "held-out"]
    print(f"\n{machine()}\n{args.examples} dialogues, {args.heldout} held out, {args.rounds} rounds\n")
    print(table(headers, rows))
    trl = max(["TRL padding-free", "TRL packed (bfd)"], key=lambda n: median(n, "tokens_per_s"))
    padded = "peftkit padded"
    print(f"\nTRL's fastest correct setting here: {trl}")
    speed = {name: median(name, "tokens_per_s") for name in results}
    peak = {name: median(name, "peak_rss") for name in results}
    loss = {name: runs[-1]["heldout_loss"] for name, runs in results.items()}
    ratios = []
    for ours in ["peftkit packed", "peftkit padding-free"]:
        ratios += [
            [f"{ours} / TRL best, tokens/s", f"{speed[ours] / speed[trl]:.2f}x"],
            [f"{ours} / peftkit padded, tokens/s", f"{speed[ours] / speed[padded]:.2f}x"],
            [f"{ours} / TRL padded, tokens/s", f"{speed[ours] / speed['TRL padded']:.2f}x"],
            [f"peak RSS, {ours} / TRL best", f"{peak[ours] / peak[trl]:.2f}x"],
            [f"held-out loss, {ours} - TRL best", f"{loss[ours] - loss[trl]:+.4f}"],
            [f"held-out loss, {ours} - peftkit padded", f"{loss[ours] - loss[padded]:+.6f}"],
        ]
    same_batches = "peftkit padding-free", "TRL padding-free"
    ratios.append(
        [" / ".join(same_batches) + ", tokens/s", f"{speed[same_batches[0]] / speed[same_batches[1]]:.2f}x"]
    )
    print(table(["ratio", "value"], ratios))


# ----------------------------------------------------------------------------------------------- workers
def run_variant(variant: str, train_file: Path, data_dir: Path, heldout: int) -> dict:
    """Train one variant; its real and padding tokens, steps, tokens/s, peak RSS, threads, held-out loss."""
    import torch

    torch.manual_seed(0)
    config = dialogsum_config(train_file, data_dir, heldout)
    if variant.startswith("peftkit"):
        outcome, model = run_peftkit(config, variant)
    else:
        outcome, model = run_trl(config, variant)
    outcome["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    outcome["threads"] = torch.get_num_threads()  # at the end of training (peftkit's are automatic)
    outcome["heldout_loss"] = heldout_loss(model, config)
    return outcome


def dialogsum_config(train_file: Path, data_dir: Path, heldout: int):  # -> TrainConfig
    from peftkit.training.train_config import load_config

    return load_config(
        REPO / "examples" / "dialogsum.yaml",
        {
            "data": str(train_file),
            "validation_data": str(data_dir / "test.jsonl"),
            "validation_rows": heldout,
            "method_options": {
                "r": 16,
                "lora_alpha": 32,
                "lora_dropout": 0.0,
                "target_modules": "all-linear",
            },
            "max_length": MAX_LENGTH,
            "gradient_checkpointing": False,
            "lr": LR,
            "lr_scheduler": "constant",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "grad_accum": 1,
            "seed": 0,
            "eval_every": 0,
            "eval_examples": 0,
            "save_every": 0,
        },
    )


def run_peftkit(config, variant: str) -> tuple[dict, object]:
    from peftkit.training.loop import train

    layout = {
        "peftkit-padded": {"packing": False, "batch_size": PADDED_BATCH},
        "peftkit-packed": {"packing": True, "batch_size": PACKED_BATCH},
        "peftkit-padding-free": {"padding_free": True, "batch_size": PADDED_BATCH},
    }[variant]
    with tempfile.TemporaryDirectory() as out:
        run = config.replace(
            **layout,
            max_steps=0,
            epochs=1.0,
            output_dir=out,
            overwrite=True,
            validation_data=None,  # held-out rows are scored after the peak is read, as for TRL
            validation_split=0.0,
        )
        result = train(run, evaluate_before=False)
    return {
        "real_tokens": result.tokens,
        "padding_tokens": result.padding_tokens,
        "steps": result.steps,
        "tokens_per_s": result.tokens / result.train_time_s,
    }, result.model


def run_trl(config, variant: str) -> tuple[dict, object]:
    import datasets
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from peftkit.foundation.loading import load_tokenizer
    from peftkit.models import load_model
    from peftkit.training.data import prepare_data

    tokenizer = load_tokenizer(config.model)
    rows = prepare_data(config.replace(packing=False), tokenizer).train.select_columns(
        ["input_ids", "labels"]
    )
    dataset = datasets.Dataset.from_list(rows.to_list())
    model, _ = load_model()
    packed = variant == "trl-packed"
    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            clock["start"] = time.perf_counter()

        def on_train_end(self, *args, **kwargs):
            clock["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=PACKED_BATCH if packed else PADDED_BATCH,
            num_train_epochs=1,
            learning_rate=LR,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=0,
            max_length=None if variant == "trl-padding-free" else MAX_LENGTH,  # rows already cut to it
            gradient_checkpointing=False,
            bf16=False,  # TRL sets bf16 autocast by default: far slower on this CPU; peftkit runs float32
            packing=packed,
            packing_strategy="bfd",
            padding_free=variant == "trl-padding-free",
            save_strategy="no",
            logging_steps=1000,
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        lora = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[Clock()],
        )
        steps = trainer.train().global_step
    real = sum(len(ids) for ids in dataset["input_ids"])
    padding = trl_padding(dataset, trainer) if variant == "trl-padded" else 0
    seconds = clock["end"] - clock["start"]
    return {
        "real_tokens": real,
        "padding_tokens": padding,
        "steps": steps,
        "tokens_per_s": real / seconds,
    }, trainer.model


def trl_padding(dataset, trainer) -> int:
    """Padding tokens of TRL's padded batches (its sampler's order, its collator)."""
    total = 0
    for batch in trainer.get_train_dataloader():
        total += int((batch["attention_mask"] == 0).sum())
    return total


def heldout_loss(model, config) -> float:
    """Mean loss per answer token of the held-out dialogues, each scored alone (float32, no padding)."""
    import torch

    from peftkit.foundation.loading import load_tokenizer
    from peftkit.objectives.tokens import token_loss_sum
    from peftkit.training.data import prepare_data

    validation = prepare_data(config.replace(packing=False), load_tokenizer(config.model)).validation
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for row in validation.select_columns(["input_ids", "labels"]).to_list():
            ids = torch.tensor([row["input_ids"]])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            loss, n = token_loss_sum(logits, torch.tensor([row["labels"]]), "causal-lm")
            total += loss.item()
            count += n.item()
    return total / count


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
