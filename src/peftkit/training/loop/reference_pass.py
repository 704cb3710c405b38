"""The reference pass of a DPO run: every pair's reference log-probabilities, once, before the first step
(or read back on ``--resume``), attached to the training rows and the held-out rows."""

from __future__ import annotations

import time

import torch

from peftkit.training.loop.context import RunContext
from peftkit.training.loop.reference import (
    COLUMNS,
    REFERENCE_FILE,
    fingerprint,
    read_saved,
    reference_log_probs,
    write_saved,
)
from peftkit.training.loop.setup import RunSetup
from peftkit.training.loop.step import loss_mode

__all__ = ["attach_reference_log_probs"]

PAIR_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]


def attach_reference_log_probs(context: RunContext, setup: RunSetup) -> None:
    """Give every pair ``reference_chosen`` and ``reference_rejected`` (DPO only; call before a checkpoint
    is loaded: the model must still be the reference, or the base under its adapter).

    Only the training rows the run's steps will take are scored (the data order is known in advance);
    the others get NaN. Every process computes them (an FSDP forward needs all processes); the main one
    writes ``reference_log_probs.safetensors``, which ``--resume`` reads instead while the pairs, the
    steps and the reference are unchanged.
    """
    if setup.preference is None or not setup.preference.uses_reference:
        return
    config, data = context.config, setup.data
    validation = data.validation.select_columns(PAIR_COLUMNS).to_list() if data.validation is not None else []
    needed = sorted({i for step in range(setup.total_steps) for i in setup.order.global_batch(step)})
    key = fingerprint([*setup.train_rows, *validation, {"needed": needed}], config)
    path = context.out / REFERENCE_FILE
    saved = read_saved(path, key) if config.resume else None
    if saved is None:
        tick = time.perf_counter()
        adapters_off = config.reference is None
        context.say(f"reference: scoring {len(needed)} training and {len(validation)} held-out pairs once")
        batch = 2 * config.batch_size  # no gradients: twice the rows fit
        rows = [setup.train_rows[i] for i in needed]
        train = torch.full((len(setup.train_rows), 2), float("nan"))
        with loss_mode(context):
            train[needed] = reference_log_probs(
                setup.model, setup.wrapped, rows, setup.collate, batch, adapters_off
            )
            held_out = reference_log_probs(
                setup.model, setup.model, validation, setup.collate, batch, adapters_off
            )
        saved = {"train": train, "validation": held_out}
        if context.main:
            write_saved(path, saved, key)
        context.wait_for_everyone()
        which = "the base model (adapter off)" if adapters_off else f"reference {config.reference}"
        context.say(
            f"reference: {which} scored {len(rows)} training and {len(held_out)} held-out pairs once "
            f"({time.perf_counter() - tick:.1f} s; kept in {REFERENCE_FILE})"
        )
    for row, values in zip(setup.train_rows, saved["train"].tolist(), strict=True):
        row.update(zip(COLUMNS, values, strict=True))
    if data.validation is not None:
        values = saved["validation"].T.tolist()
        for name, column in zip(COLUMNS, values, strict=True):
            data.validation = data.validation.add_column(name, column)
