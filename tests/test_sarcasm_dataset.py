"""The sarcasm pairs the project ships: format, breadth, and no near-duplicates."""

import itertools
import json
import re
from collections import Counter

import pytest

from gptlib import load_jsonl

from conftest import ROOT

PATH = ROOT / "dataset" / "sarcasm" / "sarcasm_instruction_pairs.jsonl"


@pytest.fixture(scope="module")
def rows():
    return [json.loads(line) for line in PATH.read_text(encoding="utf-8").splitlines()]


def _words(text):
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def _jaccard(a, b):
    return len(a & b) / len(a | b)


def test_format_size_and_topics(rows):
    assert len(rows) >= 600
    for row in rows:
        assert set(row) == {"instruction", "response", "sincere", "topic"}
        assert all(isinstance(v, str) and v.strip() for v in row.values())
    topics = Counter(row["topic"] for row in rows)
    assert len(topics) >= 20 and min(topics.values()) >= 20
    assert len(load_jsonl(PATH)) == len(rows)  # gptlib reads it in the seed guide's format


def test_sarcastic_and_sincere_answers_differ(rows):
    for row in rows:
        assert row["response"] != row["sincere"]
    assert sum(_jaccard(_words(r["response"]), _words(r["sincere"])) < 0.6 for r in rows) > 0.9 * len(rows)


def test_no_near_duplicates(rows):
    instructions = [_words(r["instruction"]) for r in rows]
    responses = [_words(r["response"]) for r in rows]
    assert len({r["instruction"].strip().lower() for r in rows}) == len(rows)
    close = [(rows[i]["instruction"], rows[j]["instruction"])
             for i, j in itertools.combinations(range(len(rows)), 2)
             if _jaccard(instructions[i], instructions[j]) >= 0.7 or _jaccard(responses[i], responses[j]) >= 0.5]
    assert close == []


def test_nothing_cruel_or_profane(rows):
    banned = re.compile(r"\b(idiot|stupid|moron|dumb|loser|shut up|hate you|damn|hell|crap)\b", re.I)
    assert [r["response"] for r in rows if banned.search(r["response"])] == []
