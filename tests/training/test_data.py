"""peftkit.training.data: file loading, row layouts, prompt masking, truncation, collation (packing:
test_packing.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from peftkit.foundation.errors import UsageError
from peftkit.foundation.tasks import IGNORE_INDEX
from peftkit.training.data import DataFormat, collate, encode, load_table, prepare_data, to_chats
from peftkit.training.data.tables import is_dataset_name
from peftkit.training.data.tokenization import tokenize
from peftkit.training.evaluation import headline_metric
from peftkit.training.train_config import load_config

from helpers.tiny_lm import build_tokenizer

ROWS = [
    {"prompt": "Meet Lena Berg, 41, a pilot based in Oslo.", "completion": '{"name": "Lena Berg"}'},
    {"prompt": "Omar Haddad is a 30-year-old chef.", "completion": '{"name": "Omar Haddad"}'},
]
DIALOGSUM = Path(__file__).resolve().parents[3] / "shared" / "data" / "dialogsum"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def plain_tokenizer():
    return build_tokenizer(plain=True)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_load_table_reads_every_file_type(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
            writer.writeheader()
            writer.writerows(ROWS)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    table = load_table(path)
    assert table.to_list() == ROWS


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "data file not found"),
        ("empty.jsonl", "", "is empty"),
        ("blank.jsonl", "\n\n  \n", "is empty"),
        ("rows.txt", "hello", "unsupported type '.txt'"),
        ("broken.jsonl", '{"prompt": "a"}\n{oops\n', "cannot read data file"),
    ],
)
def test_load_table_bad_files(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message):
        load_table(path)


# ------------------------------------------------------------------------------------------ layouts
def test_prompt_completion_with_mapped_columns_template_and_system(tmp_path: Path) -> None:
    rows = [{"text": "Lena, 41", "json": '{"a": 1}', "lang": "en"}]
    table = load_table(write_jsonl(tmp_path / "d.jsonl", rows))
    fmt = DataFormat(
        completion_column="json", prompt_template="[{lang}] Extract: {text}", system_prompt="Be terse."
    )
    chats = to_chats(table, fmt)
    assert chats[0]["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "[en] Extract: Lena, 41"},
        {"role": "assistant", "content": '{"a": 1}'},
    ]
    assert chats[0]["references"] == ['{"a": 1}']


def test_instruction_layout_joins_instruction_and_input(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    chats = to_chats(load_table(write_jsonl(tmp_path / "d.jsonl", rows)), DataFormat())
    assert chats[0]["messages"][0] == {"role": "user", "content": "Add.\n\n2 and 3"}
    assert chats[1]["messages"][0] == {"role": "user", "content": "Say hi."}
    assert chats[1]["messages"][1] == {"role": "assistant", "content": "hi"}


def test_messages_layout_keeps_turns(tmp_path: Path) -> None:
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "name?"},
        {"role": "assistant", "content": "Tiny"},
    ]
    chats = to_chats(
        load_table(write_jsonl(tmp_path / "d.jsonl", [{"chat": turns}])), DataFormat(messages_column="chat")
    )
    assert chats[0]["messages"] == turns
    assert chats[0]["references"] == ["Tiny"]


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        (DataFormat(completion_column="answr"), "column 'answr' not found .*did you mean 'answer'"),
        (DataFormat(completion_column="answer", prompt_column="question"), "column 'question' not found"),
        (DataFormat(completion_column="answer", prompt_template="Q: {querry}"), "names {querry}.*'query'"),
        (DataFormat(layout="messages"), "column 'messages' not found"),
    ],
)
def test_unknown_columns_are_named(tmp_path: Path, fmt: DataFormat, message: str) -> None:
    table = load_table(write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "answer": "a"}]))
    with pytest.raises(UsageError, match=message):
        to_chats(table, fmt)


def test_unmapped_columns_say_how_to_map(tmp_path: Path) -> None:
    table = load_table(write_jsonl(tmp_path / "d.jsonl", [{"q": "x", "a": "y"}]))
    with pytest.raises(
        UsageError, match=r"column 'completion' not found .*columns: q, a.*--completion-column"
    ):
        to_chats(table, DataFormat())


# ------------------------------------------------------------------------------------------ masking
def test_chat_template_masks_everything_but_the_answer(tokenizer) -> None:
    messages = [
        {"role": "user", "content": ROWS[0]["prompt"]},
        {"role": "assistant", "content": ROWS[0]["completion"]},
    ]
    input_ids, labels, prompt_ids = encode(tokenizer, messages)
    # reference: the template rendered as text, tokenized independently
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_text = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert input_ids == tokenizer(full_text, add_special_tokens=False)["input_ids"]
    assert prompt_ids == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    answer = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(answer) == ROWS[0]["completion"] + "<|im_end|>\n"
    assert input_ids[len(prompt_ids) :] == answer


def test_multi_turn_chats_learn_every_assistant_turn(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "name?"},
        {"role": "assistant", "content": "Tiny"},
    ]
    _input_ids, labels, prompt_ids = encode(tokenizer, messages)
    learned = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert learned == "hello<|im_end|>\nTiny<|im_end|>\n"
    assert tokenizer.decode(prompt_ids).endswith("name?<|im_end|>\n<|im_start|>assistant\n")


def test_plain_tokenizer_masks_prompt_and_ends_answer_with_eos(plain_tokenizer) -> None:
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    input_ids, labels, prompt_ids = encode(plain_tokenizer, messages)
    assert plain_tokenizer.decode(prompt_ids) == "Q?\n\n"
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids) :] == input_ids[len(prompt_ids) :]
    assert input_ids[-1] == plain_tokenizer.eos_token_id
    assert plain_tokenizer.decode(input_ids[len(prompt_ids) : -1]) == "A."


def test_truncation_keeps_the_answer_when_it_can_and_is_counted(tmp_path: Path, tokenizer) -> None:
    rows = [
        {"prompt": "short", "completion": "ok"},
        {"prompt": "head " + "y " * 200 + "tail", "completion": "the answer"},  # prompt loses its middle
        {"prompt": "q", "completion": "long answer " * 40},  # the answer alone is too long: cut at the end
        {"prompt": "z " * 100, "completion": "w " * 60},  # no room for the answer: dropped
    ]
    chats = to_chats(load_table(write_jsonl(tmp_path / "d.jsonl", rows)), DataFormat())
    out, stats = tokenize(chats, tokenizer, "causal-lm", max_length=64)
    assert stats == {"examples": 4, "truncated": 3, "dropped": 1}
    assert len(out) == 3
    assert all(len(ids) <= 64 for ids in out["input_ids"])
    assert out["targets"] == [sum(t != IGNORE_INDEX for t in labels) for labels in out["labels"]]
    cut_prompt = out[1]
    assert len(cut_prompt["input_ids"]) == 64
    assert (
        tokenizer.decode([t for t in cut_prompt["labels"] if t != IGNORE_INDEX]) == "the answer<|im_end|>\n"
    )
    prompt_text = tokenizer.decode(cut_prompt["prompt_ids"])
    assert (
        prompt_text.startswith("<|im_start|>system")
        and "tail<|im_end|>\n<|im_start|>assistant\n" in prompt_text
    )
    assert cut_prompt["input_ids"][: len(cut_prompt["prompt_ids"])] == cut_prompt["prompt_ids"]
    long_answer = out[2]
    assert len(long_answer["input_ids"]) == 64
    assert tokenizer.decode([t for t in long_answer["labels"] if t != IGNORE_INDEX]).startswith("long answer")


def test_collate_pads_right_with_ignored_labels() -> None:
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["labels"].dtype == torch.long


# ------------------------------------------------------------------------------------------ whole path
def test_bundled_task_prepares_with_template_and_held_out_split(tokenizer) -> None:
    config = load_config(None)
    data = prepare_data(config, tokenizer)
    assert len(data.train) == 400 and len(data.validation) == 100
    assert data.stats["truncated"] == 0
    prompt = tokenizer.decode(data.validation[0]["prompt_ids"])
    assert "Extract the person's name, age, job and city as one line of JSON." in prompt
    assert json.loads(data.validation[0]["references"][0])["name"] in prompt
    assert headline_metric(config.metric, config.task, data.validation["references"]) == "exact_match"


def test_validation_split_is_seeded_and_validation_rows_a_fixed_prefix(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)])
    config = load_config(None, {"data": str(path), "validation_split": 0.25, "seed": 3})
    first, second = prepare_data(config, tokenizer), prepare_data(config, tokenizer)
    assert len(first.validation) == 5 and len(first.train) == 15
    assert first.validation["references"] == second.validation["references"]
    held_out = {refs[0] for refs in first.validation["references"]}
    trained = {tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) for labels in first.train["labels"]}
    assert {answer.removesuffix("<|im_end|>\n") for answer in trained} == {
        f"a{i}" for i in range(20)
    } - held_out
    fixed = prepare_data(config.replace(validation_data=str(path), validation_rows=3), tokenizer)
    assert fixed.validation["references"] == [["a0"], ["a1"], ["a2"]]


@pytest.mark.skipif(not DIALOGSUM.is_dir(), reason="shared/data/dialogsum not present")
def test_dialogsum_prepares_as_summarization_with_three_references(tokenizer) -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "examples" / "dialogsum.yaml")
    config = config.replace(data=str(DIALOGSUM / "dev.jsonl"), validation_data=str(DIALOGSUM / "test.jsonl"))
    data = prepare_data(config, tokenizer)
    assert data.stats["examples"] == 500
    assert len(data.validation) == 100  # validation_rows: the fixed first 100 test dialogues
    first = json.loads((DIALOGSUM / "test.jsonl").read_text().splitlines()[0])
    assert data.validation[0]["references"] == [first["summary1"], first["summary2"], first["summary3"]]
    assert "Summarize the following dialogue" in tokenizer.decode(data.validation[0]["prompt_ids"])
    assert headline_metric("auto", "causal-lm", data.validation["references"]) == "rougeL"


def test_a_dataset_directory_with_splits_is_data(tmp_path: Path) -> None:
    # the same code path as a Hub id (datasets.load_dataset), here offline on a local directory
    folder = tmp_path / "myset"
    folder.mkdir()
    rows = {"train": [("a", "1"), ("b", "2"), ("c", "3")], "test": [("x", "9")]}
    for split, pairs in rows.items():
        lines = [json.dumps({"prompt": p, "completion": c}) for p, c in pairs]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    assert is_dataset_name(str(folder)) and is_dataset_name(f"{folder}:test")
    assert not is_dataset_name(str(folder / "train.jsonl")) and not is_dataset_name("person-json")
    assert load_table(f"{folder}:test")["prompt"] == ["x"]
    assert load_table(str(folder))["prompt"] == ["a", "b", "c"]  # split "train" by default


def test_a_hub_dataset_offline_says_to_pass_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert is_dataset_name("someone/no-such-set:test")
    with pytest.raises(
        UsageError, match=r"cannot load data set 'someone/no-such-set' \(split 'test'\).*--data"
    ):
        load_table("someone/no-such-set:test")


def test_a_missing_relative_data_file_names_the_directory_it_was_looked_for_in(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        UsageError, match=rf"data file not found: data/dev.jsonl \(relative to .*{tmp_path.name}\)"
    ):
        load_table("data/dev.jsonl")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_values_keep_their_text_dates_included(tmp_path, suffix) -> None:
    rows = [
        {"prompt": "the twelfth of May 2034", "completion": "2034-05-12"},
        {"prompt": "noon", "completion": "2034-05-12T12:00:00Z", "note": "a key only this row has"},
    ]
    path = tmp_path / f"dates{suffix}"
    path.write_text(json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows))
    table = load_table(path)
    assert table["completion"] == ["2034-05-12", "2034-05-12T12:00:00Z"]  # not timestamps
    assert table["note"] == [None, "a key only this row has"]


def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n')
    with pytest.raises(
        UsageError, match=r"cannot read data file .*rows.jsonl: line 2: a JSON object is needed"
    ):
        load_table(path)
