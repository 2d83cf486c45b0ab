"""Text classification with a GPT: a linear head on the hidden state of each text's last real token.

A causal model's last position is the only one that has read the whole text, so that is where the head looks.
The pieces mirror language modelling: labelled texts -> :class:`ClassificationCollator` (padded ``input_ids``,
``attention_mask``, one class index per row in ``labels``) -> :class:`GPTClassifier` -> ``loss`` -> the same
:func:`gptlib.train.train` loop. A classifier checkpoint is a gptlib checkpoint that also stores its label names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .config import GPTConfig
from .data import LengthGroupedBatches
from .errors import CheckpointError, DataError, UserInputError
from .instructions import Split, split_examples
from .model import GPTModel
from .tokenizer import Tokenizer


# ---------------------------------------------------------------- data

@dataclass
class LabelledText:
    text: str
    label: int       # index into the label names
    group: str = ""  # texts of one group (say, the two answers to one question) stay in one split
    line: int = 0    # line number in the source file, for messages


class ClassificationCollator:
    """Pads tokenised texts into ``input_ids`` and ``attention_mask`` (batch, tokens) and ``labels`` (batch,).

    Texts longer than ``max_length`` tokens are cut on the ``truncation`` side ("right" keeps the beginning).
    The padding side does not change the result: the model reads each row at its last real token.
    """

    def __init__(self, max_length: int, pad_id: int, padding_side: str = "right", truncation: str = "right"):
        if padding_side not in ("left", "right") or truncation not in ("left", "right"):
            raise ValueError("padding_side and truncation must each be 'left' or 'right'")
        self.max_length, self.pad_id = max_length, pad_id
        self.padding_side, self.truncation = padding_side, truncation

    def __call__(self, items: list[tuple[list[int], int]]) -> dict:
        rows = [ids[:self.max_length] if self.truncation == "right" else ids[-self.max_length:] for ids, _ in items]
        width = max(len(ids) for ids in rows)
        input_ids, mask = [], []
        for ids in rows:
            pad = width - len(ids)
            if self.padding_side == "right":
                input_ids.append(ids + [self.pad_id] * pad), mask.append([1] * len(ids) + [0] * pad)
            else:
                input_ids.append([self.pad_id] * pad + ids), mask.append([0] * pad + [1] * len(ids))
        return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(mask),
                "labels": torch.tensor([label for _, label in items])}


class TokenizedTexts(Dataset):
    """Labelled texts, tokenised once: item ``i`` is ``(token ids, label index)``."""

    def __init__(self, texts: list[LabelledText], tokenizer: Tokenizer):
        self.items = [(tokenizer.encode(t.text), t.label) for t in texts]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def classification_loader(texts: list[LabelledText], tokenizer: Tokenizer, batch_size: int, max_length: int,
                          shuffle: bool = True, seed: int = 123, padding_side: str = "right") -> DataLoader:
    """Batches of similar-length texts (little padding), reshuffled each epoch with ``seed + epoch``."""
    dataset = TokenizedTexts(texts, tokenizer)
    sampler = LengthGroupedBatches([len(ids) for ids, _ in dataset.items], batch_size, seed=seed, shuffle=shuffle)
    collate = ClassificationCollator(max_length, tokenizer.eot_id, padding_side=padding_side)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token (mask 1), for left and right padding alike: (batch,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


# ---------------------------------------------------------------- model

class GPTClassifier(GPTModel):
    """A :class:`GPTModel` whose output is one score per label, read from the last real token.

    It keeps every GPT weight (so a pretrained checkpoint loads into it unchanged) and adds ``cls_head``,
    a linear layer from ``emb_dim`` to the number of labels. ``model(input_ids, attention_mask)`` returns
    logits (batch, labels); ``model.loss(input_ids, labels, attention_mask)`` the mean cross-entropy, with
    ``labels`` one class index per row. :func:`choose_trainable` picks which parts train.
    """

    def __init__(self, config: GPTConfig | dict, labels: list[str], tokenizer: Tokenizer | None = None):
        super().__init__(config, tokenizer)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise UserInputError(f"a classifier needs at least two different labels, got {list(labels)}")
        self.labels = [str(label) for label in labels]
        self.cls_head = nn.Linear(self.config.emb_dim, len(self.labels))
        nn.init.normal_(self.cls_head.weight, std=0.02)
        nn.init.zeros_(self.cls_head.bias)

    @classmethod
    def from_gpt(cls, gpt: GPTModel, labels: list[str]) -> "GPTClassifier":
        """A classifier with ``gpt``'s weights and tokenizer and a new, untrained head."""
        model = cls(gpt.config, labels, gpt.tokenizer)
        model.load_state_dict(gpt.state_dict(), strict=False)  # everything but cls_head
        return model.to(gpt.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden_states(input_ids, attention_mask)  # (batch, tokens, emb_dim)
        if attention_mask is None:
            last = h[:, -1]
        else:
            last = h[torch.arange(h.shape[0], device=h.device), last_token_index(attention_mask)]
        return self.cls_head(last)  # (batch, labels)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(self(input_ids, attention_mask).float(), labels)


def choose_trainable(model: GPTClassifier, train: str | int = "all") -> int:
    """Freeze all but what ``train`` names; return the number of trainable parameters.

    ``"head"``: the classification head only (the GPT is a fixed feature extractor); an integer N: the last N
    transformer blocks, the final LayerNorm and the head; ``"all"``: every weight the classifier uses. The GPT's
    LM head is never trained: a classifier does not use it (unless it is tied to the token embedding), and
    DistributedDataParallel refuses a trainable weight that gets no gradient.
    """
    n_blocks = len(model.blocks)
    if train == "all":
        parts = [model]
    elif train == "head":
        parts = [model.cls_head]
    elif isinstance(train, int) and 0 < train <= n_blocks:
        parts = [*model.blocks[n_blocks - train:], model.final_norm, model.cls_head]
    else:
        raise UserInputError(f"what to train (--train) must be 'head', 'all' or a number of blocks from 1 to {n_blocks}, "
                             f"got {train!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for part in parts:
        for p in part.parameters():
            p.requires_grad_(True)
    if model.out_head.weight is not model.tok_emb.weight:
        model.out_head.weight.requires_grad_(False)
    return model.num_parameters(trainable_only=True)


# ---------------------------------------------------------------- using a classifier

@torch.no_grad()
def predict_proba(model: GPTClassifier, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Probability of each label for each text: (texts, labels), in the order given."""
    was_training = model.training
    model.eval()
    collate = ClassificationCollator(model.config.context_length, model.tokenizer.eot_id)
    encoded = [model.tokenizer.encode(t) for t in texts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise UserInputError(f"text {i} is empty: there is nothing to classify")
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths together: less padding
    probs = torch.empty(len(texts), len(model.labels))
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = collate([(encoded[i], 0) for i in rows])
            logits = model(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device))
            probs[rows] = logits.float().softmax(-1).cpu()
    finally:
        model.train(was_training)
    return probs


def load_classifier(path, device=None) -> GPTClassifier:
    """A classifier saved by gptlib (``gptlib classify train`` or :func:`gptlib.save_checkpoint`)."""
    from .checkpoint import load_weights, read_checkpoint
    ckpt = read_checkpoint(path, allow_classifier=True)
    if not ckpt.labels:
        raise CheckpointError(f"{path}: is a language model, not a classifier (it stores no label names); "
                              "train one with `gptlib classify train --checkpoint "
                              f"{path} ...`")
    model = GPTClassifier(ckpt.config, ckpt.labels, ckpt.tokenizer)
    load_weights(model, ckpt.model_state, source=str(path))
    return model.to(device) if device is not None else model


# ---------------------------------------------------------------- reading labelled data

def read_labelled_jsonl(path, labels: list[str] | None = None) -> tuple[list[LabelledText], list[str]]:
    """Texts and label names from JSONL lines ``{"text": ..., "label": ...}`` (an optional ``group``).

    Label names are sorted unless ``labels`` fixes them (a trained classifier's); any problem is a
    :class:`DataError` naming the line and field.
    """
    path = Path(path)
    return _labelled(path, list(_records(path)), labels)


def _labelled(path: Path, lines: list, labels: list[str] | None) -> tuple[list[LabelledText], list[str]]:
    """:func:`read_labelled_jsonl` on lines already decoded: (line number, JSON value) pairs."""
    records = []
    for number, record in lines:
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object with 'text' and 'label'")
        for field in ("text", "label"):
            if field not in record:
                raise DataError(f"{path}, line {number}: no '{field}' field (found {sorted(record)}); each line "
                                "needs 'text' and 'label'")
        text, label = record["text"], record["label"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}, line {number}: field 'text' must be a non-empty string")
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise DataError(f"{path}, line {number}: field 'label' must be a string or a whole number")
        records.append((number, text, str(label), str(record.get("group", ""))))
    names = list(labels) if labels is not None else sorted({label for _, _, label, _ in records})
    for number, _, label, _ in records:
        if label not in names:
            raise DataError(f"{path}, line {number}: unknown label {label!r}; this classifier knows {names}")
    if labels is None and len(names) < 2:
        raise DataError(f"{path}: every line has the label {names[0]!r}; a classifier needs at least two classes")
    return [LabelledText(text, names.index(label), group, number) for number, text, label, group in records], names


def read_texts(path, labels: list[str] | None = None) -> tuple[list[str], list[int] | None]:
    """The ``text`` of every line of a JSONL file to classify, read once; and when ``labels`` is given and every line
    also has a ``label``, their indices in ``labels`` (otherwise None)."""
    path = Path(path)
    lines = list(_records(path))
    if labels is not None and all(isinstance(record, dict) and "label" in record for _, record in lines):
        labelled, _ = _labelled(path, lines, labels)
        return [t.text for t in labelled], [t.label for t in labelled]
    texts = []
    for number, record in lines:
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}, line {number}: needs a non-empty string field 'text'")
        texts.append(text)
    return texts, None


SARCASM_LABELS = ["sincere", "sarcastic"]


def sarcasm_texts(path) -> list[LabelledText]:
    """Both answers of every sarcasm pair as labelled texts, grouped by instruction.

    Each line of ``dataset/sarcasm/sarcasm_instruction_pairs.jsonl`` has a sarcastic ``response`` and a
    ``sincere`` answer to one ``instruction``: two texts, labels ``SARCASM_LABELS``.
    """
    path = Path(path)
    texts = []
    for number, record in _records(path):
        for field in ("instruction", "response", "sincere"):
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}, line {number}: needs a non-empty string field '{field}' (a sarcasm pair "
                                "has 'instruction', a sarcastic 'response' and a 'sincere' answer)")
        texts.append(LabelledText(record["sincere"], 0, record["instruction"], number))
        texts.append(LabelledText(record["response"], 1, record["instruction"], number))
    return texts


def read_classification_data(path, labels: list[str] | None = None) -> tuple[list[LabelledText], list[str]]:
    """Labelled texts from either kind of JSONL file, told apart by the first line's fields: ``text``/``label``
    lines (:func:`read_labelled_jsonl`), or sarcasm pairs with ``response`` and ``sincere`` (:func:`sarcasm_texts`)."""
    path = Path(path)
    _, fields = next(_records(path))
    if isinstance(fields, dict) and "text" not in fields and {"response", "sincere"} <= set(fields):
        if labels is not None and list(labels) != SARCASM_LABELS:
            raise DataError(f"{path}: sarcasm pairs have the labels {SARCASM_LABELS}; this classifier knows {labels}")
        return sarcasm_texts(path), list(SARCASM_LABELS)
    return read_labelled_jsonl(path, labels)


def split_by_group(texts: list[LabelledText], seed: int = 123) -> Split:
    """The 85/10/5 train/test/validation split of :func:`gptlib.split_examples`, made over groups, not texts.

    Every group lands wholly in one part. Splitting texts one by one would put one answer to a question in
    training and the other in the test set, and the test would partly measure memory of the question rather
    than the style of the answer (leakage). Groups are taken in order of first appearance, so for the sarcasm
    pairs (one group per line) the parts hold exactly the instructions of ``split_examples`` on the same file:
    notebook 07's test instructions are this split's test texts.
    """
    groups = list(dict.fromkeys(t.group for t in texts))
    by_group = split_examples(groups, seed=seed)
    part = {g: name for name in ("train", "val", "test") for g in getattr(by_group, name)}
    return Split(**{name: [t for t in texts if part[t.group] == name] for name in ("train", "val", "test")})


def _records(path: Path):
    """(line number, decoded JSON value) for each non-empty line; bad JSON is a DataError naming the line."""
    for number, line in _lines(path):
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def _lines(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    lines = [(n, line) for n, line in enumerate(content.splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"{path}: is empty; expected one JSON object per line")
    return lines
