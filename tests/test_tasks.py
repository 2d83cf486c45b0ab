"""Behavioural tests for gptlib.tasks (instruction examples with exact answers)."""

import json
import random
import re

import pytest

from gptlib.tasks import (
    INSTRUCTIONS,
    TASKS,
    answer,
    exact_match,
    generate_examples,
    load_common_words,
    make_example,
    write_jsonl,
)

EXPECTED_INSTRUCTIONS = {
    "repeat": "Repeat the following words exactly.",
    "reverse": "Write the words in reverse order.",
    "capitals": "Write the words in capital letters.",
    "last_word": "What is the last word?",
    "count": "How many words are there?",
    "sort": "Sort the words alphabetically.",
}
ADD_PATTERN = re.compile(r"What is (\d+) plus (\d+)\?")


@pytest.fixture(scope="module")
def examples():
    return generate_examples(300, seed=123)


def test_word_list():
    words = load_common_words()
    assert len(words) >= 500
    assert len(set(words)) == len(words)
    assert all(re.fullmatch(r"[a-z]+", w) for w in words)
    assert words == sorted(words)


def test_task_names_and_instruction_wording():
    assert TASKS == ("repeat", "reverse", "capitals", "last_word", "count", "sort", "add")
    for task, wording in EXPECTED_INSTRUCTIONS.items():
        assert INSTRUCTIONS[task] == wording
    assert INSTRUCTIONS["add"].format(a=12, b=7) == "What is 12 plus 7?"


def test_examples_have_expected_shape(examples):
    assert len(examples) == 300 * len(TASKS)
    for ex in examples:
        assert set(ex) == {"task", "instruction", "input", "output"}
        assert all(isinstance(v, str) for v in ex.values())
        if ex["task"] == "add":
            assert ADD_PATTERN.fullmatch(ex["instruction"])
            assert ex["input"] == ""
        else:
            assert ex["instruction"] == EXPECTED_INSTRUCTIONS[ex["task"]]


def test_each_task_gets_n_examples(examples):
    for task in TASKS:
        assert sum(ex["task"] == task for ex in examples) == 300


def test_tasks_are_interleaved(examples):
    first = [ex["task"] for ex in examples[:50]]
    assert len(set(first)) > 3


def test_inputs_use_distinct_vocabulary_words(examples):
    vocab = set(load_common_words())
    for ex in examples:
        if ex["task"] == "add":
            continue
        tokens = ex["input"].split(" ")
        assert 2 <= len(tokens) <= 9
        assert len(set(tokens)) == len(tokens)
        assert set(tokens) <= vocab


def test_reference_solver_agrees_with_outputs(examples):
    for ex in examples:
        assert answer(ex["task"], ex["instruction"], ex["input"]) == ex["output"]


def test_outputs_checked_independently(examples):
    # Spell out each rule again here, without using the package's code.
    for ex in examples:
        words = ex["input"].split()
        task, out = ex["task"], ex["output"]
        if task == "repeat":
            assert out == ex["input"]
        elif task == "reverse":
            assert out.split() == words[::-1]
        elif task == "capitals":
            assert out == ex["input"].upper()
        elif task == "last_word":
            assert out == words[-1]
        elif task == "count":
            assert out == str(len(words))
        elif task == "sort":
            assert out.split() == sorted(words)
        else:
            a, b = map(int, ADD_PATTERN.fullmatch(ex["instruction"]).groups())
            assert out == str(a + b)


def test_answer_on_hand_written_cases():
    assert answer("repeat", "Repeat the following words exactly.", "red cat") == "red cat"
    assert answer("reverse", "Write the words in reverse order.", "a b c") == "c b a"
    assert answer("capitals", "Write the words in capital letters.", "big dog") == "BIG DOG"
    assert answer("last_word", "What is the last word?", "one two three") == "three"
    assert answer("count", "How many words are there?", "one two three four") == "4"
    assert answer("sort", "Sort the words alphabetically.", "pear apple fig") == "apple fig pear"
    assert answer("add", "What is 12 plus 7?", "") == "19"
    assert answer("add", "What is 99 plus 99?", "") == "198"
    assert answer("add", "What is 0 plus 0?", "") == "0"


def test_count_covers_two_to_nine(examples):
    counts = {int(ex["output"]) for ex in examples if ex["task"] == "count"}
    assert counts == set(range(2, 10))


def test_add_operands_and_sums_in_range(examples):
    sums = []
    for ex in examples:
        if ex["task"] != "add":
            continue
        a, b = map(int, ADD_PATTERN.fullmatch(ex["instruction"]).groups())
        assert 0 <= a <= 99 and 0 <= b <= 99
        sums.append(int(ex["output"]))
    assert min(sums) <= 15
    assert max(sums) >= 183
    assert all(0 <= s <= 198 for s in sums)


def test_same_seed_same_examples_different_seed_different():
    assert generate_examples(20, seed=5) == generate_examples(20, seed=5)
    assert generate_examples(20, seed=5) != generate_examples(20, seed=6)


def test_no_duplicate_instruction_input_pairs():
    examples = generate_examples(1000, seed=0)
    keys = [(ex["instruction"], ex["input"]) for ex in examples]
    assert len(keys) == len(set(keys))


def test_generate_subset_of_tasks():
    examples = generate_examples(10, seed=1, tasks=("sort", "add"))
    assert sorted(ex["task"] for ex in examples) == ["add"] * 10 + ["sort"] * 10


def test_make_example_is_deterministic_for_rng_state():
    words = load_common_words()
    for task in TASKS:
        assert make_example(task, random.Random(7), words) == make_example(task, random.Random(7), words)


def test_exact_match():
    assert exact_match("apple pie", "apple pie")
    assert exact_match("  apple pie\n", "apple pie")
    assert exact_match("42", " 42 \n")
    assert not exact_match("Apple pie", "apple pie")
    assert not exact_match("apple  pie", "apple pie")
    assert not exact_match("apple pie.", "apple pie")
    assert not exact_match("", "apple")


def test_write_jsonl_round_trip(tmp_path, examples):
    path = tmp_path / "data" / "train.jsonl"
    write_jsonl(examples[:50], path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 50
    loaded = [json.loads(line) for line in lines]
    assert loaded == examples[:50]
    assert list(loaded[0]) == ["instruction", "input", "output", "task"]
    # no temporary files are left behind
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]


def test_write_jsonl_overwrites(tmp_path, examples):
    path = tmp_path / "out.jsonl"
    write_jsonl(examples[:5], path)
    write_jsonl(examples[5:7], path)
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2


@pytest.mark.parametrize("call", [
    lambda: make_example("translate", random.Random(0), ["cat", "dog"]),
    lambda: generate_examples(3, tasks=("repeat", "translate")),
    lambda: answer("translate", "Translate.", "cat"),
])
def test_unknown_task_raises(call):
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert "translate" in message
    assert "repeat" in message and "add" in message


def test_unseen_words_never_appear_in_training_examples():
    from gptlib.tasks import generate_examples, load_common_words, split_words
    train_words, unseen = split_words(load_common_words(), unseen_share=0.1, seed=0)
    assert len(unseen) == 75 and not set(train_words) & set(unseen)
    assert split_words(load_common_words(), 0.1, seed=0) == (train_words, unseen)  # fixed
    rows = generate_examples(200, seed=0, words=train_words)
    used = {w.lower() for r in rows for w in r["input"].split()}
    assert used and not used & set(unseen)


def test_corpus_words_counts_whole_lower_case_words():
    text = "The king, the KING and the king's men. " * 3 + "men men thee a " * 10 + "rarely"
    from gptlib.tasks import corpus_words
    assert corpus_words(text, min_count=3) == ["and", "king", "men", "the", "thee"]  # "a": too short; "king's": no
    assert corpus_words(text, min_count=3, exclude=["men"]) == ["and", "king", "the", "thee"]
    assert corpus_words(text, min_count=13) == ["men"]


def test_template_text_holds_every_instruction_and_no_task_words():
    from gptlib.instructions import format_prompt
    from gptlib.tasks import template_text
    text = template_text(repeats=2)
    for task, wording in INSTRUCTIONS.items():
        assert text.count(format_prompt(wording.format(a=12, b=34), "...")) == 2
    assert "### Input:\n...\n\n### Response:\n" in text
    assert not any(f" {w} " in text for w in ("apple", "river", "cold"))
