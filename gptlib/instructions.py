"""Instruction data: reading JSONL files, the Alpaca-style prompt template, and the train/test/validation split."""

from __future__ import annotations

import codecs
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .tokenizer import END_OF_TEXT

PROMPT_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")

# Field names recognised in a JSONL line: (instruction field, input field or None, response field).
# The first pattern whose instruction and response fields are both present wins.
FIELD_PATTERNS = [
    ("instruction", "input", "output"),      # Alpaca
    ("instruction", "context", "response"),  # Dolly
    ("instruction", None, "response"),       # the seed guide
    ("prompt", None, "response"),
    ("question", None, "answer"),
]


@dataclass
class Example:
    """One instruction example, whatever the field names in the file were."""

    instruction: str
    input: str
    response: str
    line: int = 0  # line number in the source file (1-based), for error messages
    task: str = ""  # an optional "task" field (such as the skills tasks): eval then scores each task too


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt a model sees, ending right where its response should begin."""
    prompt = f"{PROMPT_HEADER}\n\n### Instruction:\n{instruction}"
    if input.strip():
        prompt += f"\n\n### Input:\n{input}"
    return prompt + "\n\n### Response:\n"


def format_example(example: Example) -> tuple[str, str]:
    """(prompt, response text) for training; the response ends with ``<|endoftext|>``."""
    return format_prompt(example.instruction, example.input), example.response + END_OF_TEXT


def parse_record(record, line: int = 0) -> Example:
    """One decoded JSON value to an :class:`Example`; ``DataError`` says which field is wrong."""
    where = f"line {line}: " if line else ""
    if not isinstance(record, dict):
        raise DataError(f"{where}expected a JSON object with fields such as 'instruction' and 'response', "
                        f"got a JSON {_json_type(record)}")
    for instruction_key, input_key, response_key in FIELD_PATTERNS:
        if instruction_key in record and response_key in record:
            break
    else:
        names = ", ".join(f"{a}/{c}" if b is None else f"{a}/{b}/{c}" for a, b, c in FIELD_PATTERNS)
        raise DataError(f"{where}no recognised field pair; found fields {sorted(record)}, expected one of: {names}")
    values = {}
    for key, required in ((instruction_key, True), (input_key, False), (response_key, True)):
        if key is None or (key not in record and not required):
            values[key] = ""
            continue
        value = record[key]
        if not isinstance(value, str):
            raise DataError(f"{where}field '{key}' must be a string, got a JSON {_json_type(value)}")
        if required and not value.strip():
            raise DataError(f"{where}field '{key}' is empty")
        values[key] = value
    task = record.get("task", "")
    if not isinstance(task, str):
        raise DataError(f"{where}field 'task' must be a string, got a JSON {_json_type(task)}")
    return Example(values[instruction_key], values[input_key] if input_key else "", values[response_key], line,
                   task)


def read_jsonl(path) -> tuple[list[Example], list[str]]:
    """All good examples of a JSONL file, and a message for every bad line (with its number)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give the path of a .jsonl file")
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # Windows Notepad's UTF-8 starts with one
    examples, problems = [], []
    for number, line_bytes in enumerate(raw.splitlines(), start=1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"{path}:{number}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8")
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: invalid JSON ({exc.msg}; column {exc.colno})")
            continue
        except RecursionError:
            problems.append(f"{path}:{number}: JSON nested too deeply to read (arrays or objects inside each "
                            "other thousands of levels deep); flatten that line")
            continue
        try:
            examples.append(parse_record(record, number))
        except DataError as exc:
            problems.append(f"{path}:{number}: {str(exc).removeprefix(f'line {number}: ')}")
    if not examples and not problems:
        problems.append(f"{path}: the file is empty; expected one JSON object per line")
    return examples, problems


def load_jsonl(path) -> list[Example]:
    """Every example of a JSONL file; a ``DataError`` listing every bad line if there is any."""
    examples, problems = read_jsonl(path)
    if problems:
        more = f" (and {len(problems) - 1} more problems; run `gptlib validate --data {path}` to list all)" \
            if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    return examples


@dataclass
class Split:
    train: list
    val: list
    test: list


def split_examples(examples: list, train: float = 0.85, test: float = 0.10, seed: int = 123) -> Split:
    """Shuffle with a fixed seed, then cut 85% train / 10% test / the rest (5%) validation.

    The same list and seed always give the same split.
    """
    if not (0 < train < 1 and 0 < test < 1 and train + test < 1):
        raise DataError(f"split fractions must be positive and leave room for validation: train={train}, test={test}")
    n = len(examples)
    n_train, n_test = int(n * train), int(n * test)
    n_val = n - n_train - n_test
    if min(n_train, n_test, n_val) < 1:
        need = next(k for k in range(3, 10_000) if min(int(k * train), int(k * test), k - int(k * train) - int(k * test)) >= 1)
        raise DataError(f"{n} examples are too few for a {train:.0%}/{test:.0%}/{1 - train - test:.0%} "
                        f"train/test/validation split: at least {need} are needed")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    shuffled = [examples[i] for i in order]
    return Split(train=shuffled[:n_train], test=shuffled[n_train:n_train + n_test],
                 val=shuffled[n_train + n_test:])


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")
