"""Write the default training task shipped with peftkit: sentences about a person → one line of JSON.

Run ``python scripts/make_default_task.py`` to regenerate ``src/peftkit/tasks/person_json/``
(deterministic: seeded). The instruction is not in the rows: the task's ``prompt_template`` in
``peftkit/tasks/__init__.py`` adds it. Test rows use first names, surnames and cities that never occur
in the training rows, so the held-out score measures extraction, not memorised names.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "peftkit" / "training" / "tasks" / "person_json"

FIRST = [
    "Maria",
    "Ahmed",
    "Lena",
    "Kofi",
    "Yuki",
    "Omar",
    "Sofia",
    "Lucas",
    "Amara",
    "Diego",
    "Ingrid",
    "Ravi",
    "Chloe",
    "Mateo",
    "Hana",
    "Tariq",
    "Elena",
    "Jonas",
    "Priya",
    "Felix",
    "Nadia",
    "Hugo",
    "Zara",
    "Kenji",
    "Leila",
    "Marco",
    "Aisha",
    "Tomas",
    "Mei",
    "Pablo",
    "Greta",
    "Samir",
    "Olga",
    "Bruno",
    "Fatima",
    "Arjun",
    "Clara",
    "Emeka",
    "Rosa",
    "Viktor",
    "Anya",
    "Idris",
    "Lucia",
    "Nikolai",
    "Sana",
    "Theo",
    "Imani",
    "Rafael",
    "Keiko",
    "Oscar",
]
LAST = [
    "Silva",
    "Okafor",
    "Novak",
    "Tanaka",
    "Haddad",
    "Berg",
    "Costa",
    "Mensah",
    "Kowalski",
    "Ortiz",
    "Lindqvist",
    "Sharma",
    "Dubois",
    "Rossi",
    "Nakamura",
    "Farouk",
    "Petrov",
    "Jensen",
    "Moreau",
    "Alvarez",
    "Nguyen",
    "Schmidt",
    "Osei",
    "Ivanova",
    "Fischer",
    "Reyes",
    "Kim",
    "Larsen",
    "Hoffmann",
    "Castillo",
    "Yilmaz",
    "Bauer",
    "Eriksen",
    "Mwangi",
    "Duarte",
    "Varga",
]
CITY = [
    "Lisbon",
    "Lagos",
    "Prague",
    "Osaka",
    "Beirut",
    "Oslo",
    "Porto",
    "Accra",
    "Krakow",
    "Bogota",
    "Uppsala",
    "Pune",
    "Lyon",
    "Turin",
    "Kyoto",
    "Cairo",
    "Sofia",
    "Aarhus",
    "Nantes",
    "Seville",
    "Hanoi",
    "Munich",
    "Kumasi",
    "Kazan",
    "Bremen",
    "Lima",
    "Busan",
    "Bergen",
    "Graz",
    "Quito",
    "Izmir",
    "Leipzig",
    "Malmo",
    "Nairobi",
    "Braga",
    "Szeged",
    "Dublin",
    "Tunis",
    "Valencia",
    "Dakar",
    "Riga",
    "Antwerp",
    "Perth",
    "Nagoya",
]
JOB = [
    "nurse",
    "teacher",
    "pilot",
    "chef",
    "architect",
    "plumber",
    "baker",
    "lawyer",
    "dentist",
    "farmer",
    "librarian",
    "electrician",
    "journalist",
    "pharmacist",
    "carpenter",
    "photographer",
    "translator",
    "mechanic",
    "designer",
    "firefighter",
]
TEMPLATES = (
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "Meet {name}, {age}, a {job} based in {city}.",
    "In {city}, {name} works as a {job}. {name_first} is {age} years old.",
    "{age}-year-old {job} {name} just moved to {city}.",
    "The {job} {name} ({age}) has lived in {city} for years.",
    "{name} from {city} turned {age} this spring and still works as a {job}.",
    "Our new neighbour is {name}, a {job} aged {age}, originally from {city}.",
    "At {age}, {name} is the best-known {job} in {city}.",
    "{city} resident {name}, {age}, has been a {job} since leaving school.",
    "Ask any {job} in {city} about {name}: everyone knows the {age}-year-old.",
)


def split_names(rng: random.Random, names: list[str], held_out: int) -> tuple[list[str], list[str]]:
    """Shuffle ``names`` and split off ``held_out`` of them for the test rows only."""
    names = names[:]
    rng.shuffle(names)
    return names[held_out:], names[:held_out]


def make_rows(
    rng: random.Random, count: int, first: list[str], last: list[str], city: list[str]
) -> list[dict]:
    """``count`` rows of ``{"prompt", "completion"}`` with people drawn from the given pools."""
    rows = []
    for _ in range(count):
        name_first, surname = rng.choice(first), rng.choice(last)
        person = {"name": f"{name_first} {surname}", "age": rng.randint(19, 87), "job": rng.choice(JOB)}
        person["city"] = rng.choice(city)
        sentence = rng.choice(TEMPLATES).format(name_first=name_first, **person)
        rows.append({"prompt": sentence, "completion": json.dumps(person)})
    return rows


def main() -> None:
    """Write train.jsonl (400 rows) and test.jsonl (100 rows)."""
    rng = random.Random(20240611)
    first_train, first_test = split_names(rng, FIRST, 10)
    last_train, last_test = split_names(rng, LAST, 8)
    city_train, city_test = split_names(rng, CITY, 10)
    splits = {
        "train": make_rows(rng, 400, first_train, last_train, city_train),
        "test": make_rows(rng, 100, first_test, last_test, city_test),
    }
    write_splits(OUT, splits, "rows")


def write_splits(out: Path, splits: dict[str, list[dict]], unit: str) -> None:
    """Write each split as ``out/<split>.jsonl``, one JSON object per line, and say how many ``unit``."""
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"wrote {len(rows)} {unit} to {out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
