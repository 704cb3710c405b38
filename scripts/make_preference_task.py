"""Write the bundled preference task: a sentence about a person → the right line of JSON (chosen) or a
worse answer (rejected).

Run ``python scripts/make_preference_task.py`` to regenerate
``src/peftkit/training/tasks/person_json_pairs/`` (seeded: the same files every time). The people,
sentences and name/city pools are person-json's (``scripts/make_default_task.py``); the test rows use
first names, surnames and cities that no training row has. Each row is ``{"prompt", "chosen",
"rejected"}``: the chosen answer is the person as one line of JSON; the rejected one is, in three rows
out of four, that JSON with one field wrong (another age, job, city or surname), and otherwise the
sentence repeated, which is what SmolLM2-135M-Instruct writes when asked (the form to move away from).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from make_default_task import CITY, FIRST, JOB, LAST, TEMPLATES, split_names, write_splits

OUT = Path(__file__).resolve().parent.parent / "src" / "peftkit" / "training" / "tasks" / "person_json_pairs"
ECHO_SHARE = 0.25  # rejected = the sentence itself; else the JSON with one field wrong
FIELDS = ("name", "age", "job", "city")


def wrong_field(rng: random.Random, person: dict, last: list[str], city: list[str]) -> dict:
    """``person`` with one field (chosen at random) replaced by another value of its kind."""
    wrong = dict(person)
    field = rng.choice(FIELDS)
    if field == "age":
        wrong["age"] = rng.choice([age for age in range(19, 88) if age != person["age"]])
    elif field == "job":
        wrong["job"] = rng.choice([job for job in JOB if job != person["job"]])
    elif field == "city":
        wrong["city"] = rng.choice([c for c in city if c != person["city"]])
    else:
        first, surname = person["name"].split(" ", 1)
        wrong["name"] = f"{first} {rng.choice([s for s in last if s != surname])}"
    return wrong


def make_pairs(
    rng: random.Random, count: int, first: list[str], last: list[str], city: list[str]
) -> list[dict]:
    """``count`` rows of ``{"prompt", "chosen", "rejected"}`` with people drawn from the given pools."""
    rows = []
    for _ in range(count):
        name_first, surname = rng.choice(first), rng.choice(last)
        person = {"name": f"{name_first} {surname}", "age": rng.randint(19, 87), "job": rng.choice(JOB)}
        person["city"] = rng.choice(city)
        sentence = rng.choice(TEMPLATES).format(name_first=name_first, **person)
        rejected = sentence if rng.random() < ECHO_SHARE else json.dumps(wrong_field(rng, person, last, city))
        rows.append({"prompt": sentence, "chosen": json.dumps(person), "rejected": rejected})
    return rows


def main() -> None:
    """Write train.jsonl (400 pairs) and test.jsonl (100 pairs)."""
    rng = random.Random(20260127)
    first_train, first_test = split_names(rng, FIRST, 10)
    last_train, last_test = split_names(rng, LAST, 8)
    city_train, city_test = split_names(rng, CITY, 10)
    splits = {
        "train": make_pairs(rng, 400, first_train, last_train, city_train),
        "test": make_pairs(rng, 100, first_test, last_test, city_test),
    }
    write_splits(OUT, splits, "pairs")


if __name__ == "__main__":
    main()
