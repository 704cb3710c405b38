"""Training tasks shipped inside peftkit, usable by name as ``data:`` (``peftkit train --data person-json``).

``person-json``: a sentence about a person → that person as one line of JSON, scored by exact match.
SmolLM2-135M-Instruct gets it wrong (it echoes or reformats the sentence); a few minutes of LoRA on two
CPU cores get most held-out rows exactly right. Test rows use names and cities absent from the training
rows. Regenerate with ``python scripts/make_default_task.py``.

``person-json-pairs``: the same sentences as preference pairs for ``--objective dpo|orpo|simpo``: the
chosen answer is the right line of JSON, the rejected one that JSON with one field wrong (three pairs in
four) or the sentence repeated (what the base model writes). Regenerate with
``python scripts/make_preference_task.py``. Its DPO runs add the chosen answer's NLL (``rpo_alpha: 1``):
plain DPO ranks the held-out pairs right but its greedy answers are never the chosen line
(docs/design.md, preference objectives).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BUILTIN_TASKS", "BuiltinTask", "builtin_task"]

_HERE = Path(__file__).resolve().parent
PERSON_JSON_INSTRUCTION = "Extract the person's name, age, job and city as one line of JSON.\n\n"


@dataclass(frozen=True)
class BuiltinTask:
    """A shipped data set: its files and the training settings that go with it.

    Args:
        name: what ``data:`` names it by.
        train: the training file.
        validation: the held-out file.
        settings: train-config keys the task sets unless the user sets them.
        example: a prompt to try the trained model on.
    """

    name: str
    train: Path
    validation: Path
    settings: dict[str, Any] = field(default_factory=dict)
    example: str = ""


BUILTIN_TASKS = {
    "person-json": BuiltinTask(
        name="person-json",
        train=_HERE / "person_json" / "train.jsonl",
        validation=_HERE / "person_json" / "test.jsonl",
        settings={
            "prompt_template": PERSON_JSON_INSTRUCTION + "{prompt}",
            "metric": "exact_match",
        },
        example="Ada Park, 36, has worked as a surgeon in Toronto for ten years.",
    ),
    "person-json-pairs": BuiltinTask(
        name="person-json-pairs",
        train=_HERE / "person_json_pairs" / "train.jsonl",
        validation=_HERE / "person_json_pairs" / "test.jsonl",
        settings={"prompt_template": PERSON_JSON_INSTRUCTION + "{prompt}", "rpo_alpha": 1.0},
        example="Ada Park, 36, has worked as a surgeon in Toronto for ten years.",
    ),
}


def builtin_task(name: str) -> BuiltinTask | None:
    """The shipped task called ``name``, or None."""
    return BUILTIN_TASKS.get(name)
