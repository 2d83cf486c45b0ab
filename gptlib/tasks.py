"""Tiny instruction tasks whose answers can be checked exactly.

Each example is a dict with four string fields::

    {"task": "reverse",
     "instruction": "Write the words in reverse order.",
     "input": "apple river cold",
     "output": "cold river apple"}

The instruction and input go into the prompt template; the output is what the
model should write. Because every answer is fully determined by the
instruction and input, we can measure accuracy with exact string match
(see :func:`exact_match`) before and after fine-tuning.
"""

from __future__ import annotations

import json
import os
import random
import re
from importlib import resources
from pathlib import Path
from typing import Iterable

from .evaluate import exact_match  # noqa: F401  (re-exported: tasks are scored by exact match)
from .files import atomic_write

# Short task names, in a fixed order.
TASKS: tuple[str, ...] = (
    "repeat",
    "reverse",
    "capitals",
    "last_word",
    "count",
    "sort",
    "add",
)

# Instruction wording for each task. For "add" it is a format string.
INSTRUCTIONS: dict[str, str] = {
    "repeat": "Repeat the following words exactly.",
    "reverse": "Write the words in reverse order.",
    "capitals": "Write the words in capital letters.",
    "last_word": "What is the last word?",
    "count": "How many words are there?",
    "sort": "Sort the words alphabetically.",
    "add": "What is {a} plus {b}?",
}

# How many words go into the input of each word task (inclusive range).
# Tasks that make the model copy every word use shorter inputs so that a
# tiny model has a fair chance of learning them.
WORD_COUNTS: dict[str, tuple[int, int]] = {
    "repeat": (2, 6),
    "reverse": (2, 6),
    "capitals": (2, 6),
    "last_word": (2, 9),
    "count": (2, 9),
    "sort": (2, 6),
}

# Operands of the "add" task are drawn from this inclusive range.
ADD_MIN, ADD_MAX = 0, 99

MIN_WORDS_IN_LIST = 500
_WORD_RE = re.compile(r"[a-z]+")
_WHOLE_WORD_RE = re.compile(r"(?<![A-Za-z'])[a-z]+(?![A-Za-z'])")
_ADD_RE = re.compile(r"What is (\d+) plus (\d+)\?")


def _check_task(task: str) -> None:
    """Raise ValueError if ``task`` is not one of :data:`TASKS`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks are: {', '.join(TASKS)}")


def load_common_words() -> list[str]:
    """Return the packaged list of common lower-case English words.

    The list lives in ``gptlib/assets/common_words.txt`` (one word per line).
    It is checked so that a broken file fails loudly rather than silently
    producing odd examples.
    """
    text = resources.files("gptlib").joinpath("assets", "common_words.txt").read_text(encoding="utf-8")
    words = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [w for w in words if not _WORD_RE.fullmatch(w)]
    if bad:
        raise ValueError(f"common_words.txt has words that are not lower-case a-z: {bad[:5]}")
    if len(set(words)) != len(words):
        raise ValueError("common_words.txt contains duplicate words")
    if len(words) < MIN_WORDS_IN_LIST:
        raise ValueError(f"common_words.txt has {len(words)} words, need at least {MIN_WORDS_IN_LIST}")
    return words


def make_example(task: str, rng: random.Random, words: list[str]) -> dict:
    """Make one random example of ``task``.

    ``rng`` supplies all randomness, so the same rng state gives the same
    example. ``words`` is the vocabulary to draw from (ignored by "add").
    Returns a dict with keys "task", "instruction", "input" and "output".
    """
    _check_task(task)

    if task == "add":
        a = rng.randint(ADD_MIN, ADD_MAX)
        b = rng.randint(ADD_MIN, ADD_MAX)
        instruction = INSTRUCTIONS["add"].format(a=a, b=b)
        return {"task": task, "instruction": instruction, "input": "", "output": str(a + b)}

    low, high = WORD_COUNTS[task]
    k = rng.randint(low, high)
    pool = list(dict.fromkeys(words))  # drop any repeated words, keep order
    if len(pool) < k:
        raise ValueError(f"need at least {k} distinct words, got {len(pool)}")
    chosen = rng.sample(pool, k)  # k distinct words in random order

    if task == "repeat":
        output_words = chosen
    elif task == "reverse":
        output_words = chosen[::-1]
    elif task == "capitals":
        output_words = [w.upper() for w in chosen]
    elif task == "last_word":
        output_words = [chosen[-1]]
    elif task == "count":
        output_words = [str(len(chosen))]
    else:  # "sort"
        output_words = sorted(chosen)

    return {
        "task": task,
        "instruction": INSTRUCTIONS[task],
        "input": " ".join(chosen),
        "output": " ".join(output_words),
    }


def split_words(words: list[str], unseen_share: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split the word list into (training words, unseen words), a fixed ``unseen_share`` held out.

    Examples made from the unseen words test whether the model learned the *rule* (copy, reverse, capitalise)
    rather than memorising answers for the words it trained on.
    """
    if not 0 <= unseen_share < 1:
        raise ValueError(f"unseen_share must be in [0, 1), got {unseen_share}")
    shuffled = list(words)
    random.Random(seed).shuffle(shuffled)
    n_unseen = round(len(shuffled) * unseen_share)
    return sorted(shuffled[n_unseen:]), sorted(shuffled[:n_unseen])


def corpus_words(text: str, min_count: int = 10, exclude: Iterable[str] = ()) -> list[str]:
    """Lower-case words (2-10 letters) that occur at least ``min_count`` times as whole words in ``text``, sorted,
    leaving out ``exclude``.

    The plays hold about 4,000 such words. Training examples drawn from them as well as from the common-word list
    give a model too many words to memorise answers for, so it has to learn the rule; leave the held-out words of
    :func:`split_words` out, so they stay unseen.
    """
    counts: dict[str, int] = {}
    for word in _WHOLE_WORD_RE.findall(text):
        counts[word] = counts.get(word, 0) + 1
    excluded = set(exclude)
    return sorted(w for w, n in counts.items() if n >= min_count and 2 <= len(w) <= 10 and w not in excluded)


def template_text(repeats: int = 1000) -> str:
    """The prompt template around every task's instruction, ``repeats`` times over, with no task words in it.

    Part of the text the workbook's tokenizer is trained on: with it, the template's fixed words become a few
    tokens, while the task words still split as they do in the plays (seen and unseen words alike).
    """
    from .instructions import format_prompt
    prompts = [format_prompt(INSTRUCTIONS[task].format(a=12, b=34), "...") for task in TASKS]
    return "\n\n".join(prompts * repeats)


def generate_examples(n_per_task: int, seed: int = 0, tasks: Iterable[str] = TASKS,
                      words: list[str] | None = None) -> list[dict]:
    """Make ``n_per_task`` distinct examples of every task, shuffled together.

    The result depends only on the arguments: the same seed always gives the
    same list. No (instruction, input) pair appears twice. ``words`` is the
    vocabulary to draw from (default: the packaged common words).
    """
    tasks = tuple(dict.fromkeys(tasks))  # keep order, drop repeated names
    for task in tasks:
        _check_task(task)
    if n_per_task < 0:
        raise ValueError(f"n_per_task must be >= 0, got {n_per_task}")

    n_sums = (ADD_MAX - ADD_MIN + 1) ** 2
    if "add" in tasks and n_per_task > n_sums:
        raise ValueError(f"only {n_sums} distinct 'add' examples exist, asked for {n_per_task}")

    rng = random.Random(seed)
    words = load_common_words() if words is None else list(words)
    seen: set[tuple[str, str]] = set()
    examples: list[dict] = []

    for task in tasks:
        made = 0
        tries = 0
        max_tries = 100 * n_per_task + 1000
        while made < n_per_task:
            tries += 1
            if tries > max_tries:
                raise ValueError(f"could not make {n_per_task} distinct {task!r} examples")
            example = make_example(task, rng, words)
            key = (example["instruction"], example["input"])
            if key in seen:
                continue  # a duplicate: draw again
            seen.add(key)
            examples.append(example)
            made += 1

    rng.shuffle(examples)  # interleave the tasks
    return examples


def answer(task: str, instruction: str, input: str) -> str:
    """Compute the correct output from the instruction and input.

    This is a reference solver written separately from :func:`make_example`,
    so it can be used to double-check generated data.
    """
    _check_task(task)

    if task == "add":
        match = _ADD_RE.fullmatch(instruction.strip())
        if match is None:
            raise ValueError(f"not an addition instruction: {instruction!r}")
        return str(int(match.group(1)) + int(match.group(2)))

    if instruction.strip() != INSTRUCTIONS[task]:
        raise ValueError(f"instruction {instruction!r} does not belong to task {task!r}")
    tokens = input.split()
    if task == "repeat":
        return " ".join(tokens)
    if task == "reverse":
        return " ".join(reversed(tokens))
    if task == "capitals":
        return " ".join(t.upper() for t in tokens)
    if task == "last_word":
        return tokens[-1] if tokens else ""
    if task == "count":
        return str(len(tokens))
    return " ".join(sorted(tokens))  # "sort"


def write_jsonl(examples: Iterable[dict], path: str | os.PathLike) -> None:
    """Write examples to ``path`` as JSON Lines (keys instruction, input, output, task), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ("instruction", "input", "output", "task")
    lines = "".join(json.dumps({k: ex[k] for k in keys}, ensure_ascii=False) + "\n" for ex in examples)
    atomic_write(path, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
