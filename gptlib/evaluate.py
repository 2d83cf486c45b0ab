"""Measuring a model: loss and perplexity over a data loader, and scores for generated answers."""

from __future__ import annotations

import math
import re

import torch

from .model import IGNORE_INDEX, GPTModel


def evaluate_loss(model: GPTModel, loader, max_batches: int | None = None, device=None) -> float:
    """Mean cross-entropy per label over the loader: per labelled token for a language model (every token counts
    the same), per text for a classifier; whatever ``model.loss`` takes the mean over."""
    total, count = loss_totals(model, loader, max_batches, device)
    if count == 0:
        raise ValueError("no labelled tokens to evaluate: every label is -100 or the loader is empty")
    return total / count


@torch.no_grad()
def loss_totals(model: GPTModel, loader, max_batches: int | None = None, device=None, rank: int = 0,
                processes: int = 1) -> tuple[float, int]:
    """The summed loss and the number of labels over the loader's first ``max_batches`` batches (all: None).

    With ``processes`` > 1, only every ``processes``-th of those batches from ``rank`` on: processes that share
    an evaluation add up their totals (see ``gptlib.distributed.World.sum``)."""
    device = device or model.device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            if i % processes != rank:
                continue
            batch = {key: value.to(device) for key, value in batch.items()}
            labels = batch["labels"]
            keep = labels != IGNORE_INDEX
            if not keep.any():
                continue
            n = int(keep.sum())
            total += float(model.loss(batch["input_ids"], labels, batch.get("attention_mask"))) * n
            count += n
    finally:
        model.train(was_training)
    return total, count


def perplexity(loss: float) -> float:
    """exp(loss): the number of equally likely tokens the model is, on average, choosing between."""
    return math.exp(min(loss, 50.0))


def exact_match(prediction: str, target: str) -> bool:
    """Equal after stripping surrounding white space (and otherwise exactly, case included)."""
    return prediction.strip() == target.strip()


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of words, as an F-measure of precision and recall."""
    a, b = _words(prediction), _words(reference)
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def score_answers(model: GPTModel, examples, max_new_tokens: int = 128, progress: bool = False,
                  batch_size: int = 64) -> dict:
    """Greedy answers to instruction examples, scored by exact match and ROUGE-L against the references.

    Answers are generated ``batch_size`` prompts at a time (:func:`~gptlib.generate.answer_instructions`; the same
    answers as one at a time, faster). Returns ``{"exact_match", "rouge_l", "predictions": [{"instruction",
    "input", "reference", "prediction", "exact_match", "rouge_l"}, ...]}``, the two scores being means over the
    examples; when the examples have a ``task``, also ``"by_task": {task: {"examples", "exact_match",
    "rouge_l"}}``.
    """
    from tqdm.auto import tqdm

    from .generate import answer_instructions

    examples = list(examples)
    predictions = []
    with tqdm(total=len(examples), desc="answering", disable=not progress) as bar:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            predictions += answer_instructions(model, [(e.instruction, e.input) for e in chunk], max_new_tokens,
                                               batch_size=batch_size)
            bar.update(len(chunk))
    rows = []
    for example, prediction in zip(examples, predictions):
        row = {"instruction": example.instruction, "input": example.input, "reference": example.response,
               "prediction": prediction, "exact_match": exact_match(prediction, example.response),
               "rouge_l": rouge_l(prediction, example.response)}
        if getattr(example, "task", ""):
            row["task"] = example.task
        rows.append(row)
    result = _means(rows)
    result["predictions"] = rows
    tasks = sorted({row["task"] for row in rows if "task" in row})
    if tasks:
        result["by_task"] = {task: {"examples": sum(r.get("task") == task for r in rows),
                                    **_means([r for r in rows if r.get("task") == task])} for task in tasks}
    return result


def _means(rows: list[dict]) -> dict:
    n = max(1, len(rows))
    return {"exact_match": sum(r["exact_match"] for r in rows) / n, "rouge_l": sum(r["rouge_l"] for r in rows) / n}


def bits_per_character(model: GPTModel, token_ids, batch_size: int = 32, device=None) -> float:
    """Bits per character of a token stream under the model: comparable across tokenizers, unlike loss per token.

    The stream is cut into non-overlapping windows of the model's context; every predicted token's loss (nats) is
    summed, converted to bits and divided by the characters those tokens spell (``model.tokenizer``).
    """
    from .data import window_loader
    ids = list(token_ids)
    ctx = model.config.context_length
    loader = window_loader(ids, ctx, batch_size, shuffle=False)
    n_predicted = len(loader.dataset) * ctx
    nats = evaluate_loss(model, loader, device=device) * n_predicted
    characters = len(model.tokenizer.decode(ids[1:n_predicted + 1]))
    return nats / math.log(2) / characters


def known_word_share(text: str, known_words: set[str]) -> float:
    """Share of the words of ``text`` (lower-cased) found in ``known_words``: does a sample use the corpus's words?"""
    words = _words(text)
    return sum(w in known_words for w in words) / len(words) if words else 0.0


def is_degenerate(text: str, n: int = 3, times: int = 3) -> bool:
    """True when some word ``n``-gram occurs ``times`` times or more: the model is repeating itself."""
    words = _words(text)
    counts: dict[tuple, int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= times:
            return True
    return False


def response_bits_per_character(model: GPTModel, examples, batch_size: int = 16) -> float:
    """Bits per character of the reference responses given their prompts (the end-of-text counts as one
    character): a response loss that compares across tokenizers."""
    from .data import instruction_loader
    loader = instruction_loader(list(examples), batch_size, model.config.context_length, shuffle=False,
                                tokenizer=model.tokenizer)
    labelled = sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in loader)
    characters = sum(len(e.response) + 1 for e in examples)
    return evaluate_loss(model, loader) * labelled / math.log(2) / characters


def response_token_losses(model: GPTModel, example) -> tuple[list[str], list[float]]:
    """Every response token of ``example`` (the closing end-of-text last) with the model's loss on it, in nats.

    The loss of one token is -log p(token | everything before it): how surprised the model is. Their mean is the
    example's response loss, the number ``evaluate_loss`` averages over a split. An example longer than the
    context loses the start of its prompt, never its answer.
    """
    from .data import InstructionCollator, tokenize_example
    tokenizer = model.tokenizer
    batch = InstructionCollator(model.config.context_length, truncation="left", pad_id=tokenizer.eot_id)(
        [tokenize_example(example, tokenizer)])
    keep = batch["labels"][0] != IGNORE_INDEX
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(batch["input_ids"].to(next(model.parameters()).device))[0].cpu()[keep].float()
    model.train(was_training)
    targets = batch["labels"][0, keep]
    losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return [tokenizer.decode([int(t)]) for t in targets], losses.tolist()


# ---------------------------------------------------------------- classification

def classification_scores(true: list[int], predicted: list[int], positive: int = 1) -> dict:
    """Accuracy, and precision, recall and F1 of the ``positive`` class (0 when undefined, as scikit-learn)."""
    if len(true) != len(predicted) or not true:
        raise ValueError(f"need as many predictions as labels, and at least one: {len(true)} and {len(predicted)}")
    pairs = list(zip(true, predicted))
    hits = sum(t == p for t, p in pairs)
    tp = sum(t == positive and p == positive for t, p in pairs)
    predicted_pos, actual_pos = sum(p == positive for p in predicted), sum(t == positive for t in true)
    precision = tp / predicted_pos if predicted_pos else 0.0
    recall = tp / actual_pos if actual_pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": hits / len(pairs), "precision": precision, "recall": recall, "f1": f1}


def bootstrap_interval(true: list[int], predicted: list[int], metric: str = "accuracy", samples: int = 2000,
                       level: float = 0.95, seed: int = 0, positive: int = 1) -> tuple[float, float]:
    """A percentile bootstrap interval for one of :func:`classification_scores`' metrics.

    The test texts are drawn again with replacement ``samples`` times; the middle ``level`` of the metric's values
    is the interval. It shows how much the figure owes to which texts happened to be in a small test set.
    """
    import random
    rng, n = random.Random(seed), len(true)
    values = []
    for _ in range(samples):
        rows = [rng.randrange(n) for _ in range(n)]
        values.append(classification_scores([true[i] for i in rows], [predicted[i] for i in rows], positive)[metric])
    values.sort()
    cut = int(samples * (1 - level) / 2)
    return values[cut], values[samples - 1 - cut]
