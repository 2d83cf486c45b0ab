import json

import pytest

from gptlib import DataError, Example, format_prompt, load_jsonl, split_examples
from gptlib.instructions import format_example, read_jsonl

TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}{input_part}\n\n### Response:\n"
)


def test_prompt_template_is_exact():
    assert format_prompt("Say hi.") == TEMPLATE.format(instruction="Say hi.", input_part="")
    assert format_prompt("Sort.", "b a") == TEMPLATE.format(instruction="Sort.", input_part="\n\n### Input:\nb a")
    assert format_prompt("Say hi.", "   ") == format_prompt("Say hi.")  # blank input: no section
    prompt, response = format_example(Example("Say hi.", "", "Hi."))
    assert response == "Hi.<|endoftext|>"


@pytest.mark.parametrize("record, expected", [
    ({"instruction": "I", "response": "R"}, ("I", "", "R")),
    ({"instruction": "I", "input": "X", "output": "R"}, ("I", "X", "R")),
    ({"instruction": "I", "input": "", "output": "R"}, ("I", "", "R")),
    ({"prompt": "I", "response": "R"}, ("I", "", "R")),
    ({"question": "I", "answer": "R"}, ("I", "", "R")),
    ({"instruction": "I", "context": "X", "response": "R", "category": "qa"}, ("I", "X", "R")),
])
def test_every_field_pattern_is_recognised(tmp_path, record, expected):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    [example] = load_jsonl(path)
    assert (example.instruction, example.input, example.response) == expected


def test_every_bad_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [
        json.dumps({"instruction": "ok", "response": "fine"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"instruction": "x"}),
        json.dumps({"instruction": "", "response": "y"}),
        json.dumps({"instruction": 3, "response": "y"}),
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe bad bytes\n")
    examples, problems = read_jsonl(path)
    assert len(examples) == 1
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4", "5", "6", "7"]
    assert "invalid JSON" in problems[0] and "array" in problems[1]
    assert "no recognised field pair" in problems[2] and "'instruction' is empty" in problems[3]
    assert "'instruction' must be a string" in problems[4] and "UTF-8" in problems[5]
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON.*and 5 more problems"):
        load_jsonl(path)


def test_missing_empty_and_directory_paths(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        load_jsonl(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_jsonl(tmp_path / "empty.jsonl")


def test_split_is_85_10_5_and_stable():
    items = list(range(1000))
    split = split_examples(items, seed=123)
    assert (len(split.train), len(split.test), len(split.val)) == (850, 100, 50)
    assert sorted(split.train + split.test + split.val) == items
    again = split_examples(list(range(1000)), seed=123)
    assert (again.train, again.test, again.val) == (split.train, split.test, split.val)
    assert split_examples(items, seed=124).train != split.train


def test_split_refuses_too_few_examples():
    with pytest.raises(DataError, match="too few.*at least"):
        split_examples(list(range(5)))
    assert len(split_examples(list(range(20))).val) == 1
