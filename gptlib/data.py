"""From token ids to training batches: pretraining windows, instruction examples, the collator, batching.

Every batch is a dict of tensors ``input_ids``, ``labels`` and ``attention_mask``, all (batch, tokens).
``labels[b, t]`` is the token that should follow ``input_ids[b, t]``, or -100 where no loss is taken
(prompt tokens when prompt masking is on, and padding).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import DataError
from .instructions import Example, format_example
from .model import IGNORE_INDEX
from .tokenizer import EOT_ID, GPT2, Tokenizer


# ---------------------------------------------------------------- pretraining

class TokenWindows(Dataset):
    """Windows of ``length`` tokens over one long token stream, starting every ``stride`` tokens.

    Item ``i`` is ``(input_ids, labels)``: the window, and the same window shifted one token left.
    """

    def __init__(self, token_ids, length: int, stride: int | None = None):
        self.ids = torch.as_tensor(token_ids, dtype=torch.long)
        self.length = length
        self.stride = stride or length
        if length < 1 or self.stride < 1:
            raise DataError(f"window length and stride must be positive, got {length} and {self.stride}")
        if len(self.ids) < length + 1:
            raise DataError(f"the text has {len(self.ids)} tokens, fewer than one window of {length} + 1: "
                            "use more text or a shorter context length")
        self.starts = range(0, len(self.ids) - length, self.stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        chunk = self.ids[self.starts[i]: self.starts[i] + self.length + 1]
        return chunk[:-1], chunk[1:]


def collate_windows(items) -> dict:
    input_ids = torch.stack([x for x, _ in items])
    return {"input_ids": input_ids, "labels": torch.stack([y for _, y in items]),
            "attention_mask": torch.ones_like(input_ids)}


# ---------------------------------------------------------------- instructions

@dataclass
class TokenizedExample:
    ids: list[int]   # prompt and response tokens, ending with <|endoftext|>
    prompt_len: int  # how many of them belong to the prompt


def tokenize_example(example: Example, tokenizer: Tokenizer = GPT2) -> TokenizedExample:
    """Tokenise prompt and response separately so we know where the response starts.

    (The template's prompt ends with a newline, which a byte-level BPE with GPT-2's word-splitting pattern
    never merges with the next word, so this gives the same ids as tokenising the whole text at once.)
    """
    prompt, response = format_example(example)
    prompt_ids = tokenizer.encode(prompt)
    return TokenizedExample(prompt_ids + tokenizer.encode(response), len(prompt_ids))


class InstructionDataset(Dataset):
    """Instruction examples, tokenised once up front (with the model's tokenizer; GPT-2's by default)."""

    def __init__(self, examples: list[Example], tokenizer: Tokenizer = GPT2):
        self.items = [tokenize_example(e, tokenizer) for e in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i) -> TokenizedExample:
        return self.items[i]

    def lengths(self) -> list[int]:
        return [len(item.ids) - 1 for item in self.items]  # tokens the model sees


class InstructionCollator:
    """Pads a list of :class:`TokenizedExample` into a batch, with labels and an attention mask.

    - dynamic padding: to the longest sequence in this batch, not to the context length;
    - labels -100 on padding, and on the prompt when ``mask_prompt`` is on (the default);
    - sequences longer than ``max_length`` tokens are cut on the ``truncation`` side: "right" drops the end
      of the response, "left" drops the start of the prompt (and keeps the answer);
    - ``padding_side`` "right" for training; "left" lines up the last tokens, as batched generation needs.
    """

    def __init__(self, max_length: int, mask_prompt: bool = True, truncation: str = "right",
                 padding_side: str = "right", pad_id: int = EOT_ID):
        if truncation not in ("left", "right") or padding_side not in ("left", "right"):
            raise ValueError("truncation and padding_side must each be 'left' or 'right'")
        self.max_length = max_length
        self.mask_prompt = mask_prompt
        self.truncation = truncation
        self.padding_side = padding_side
        self.pad_id = pad_id

    def inputs_and_labels(self, item: TokenizedExample) -> tuple[list[int], list[int]]:
        """One example's (input ids, labels) before padding."""
        ids, prompt_len = item.ids, item.prompt_len
        if len(ids) > self.max_length + 1:
            if self.truncation == "right":
                ids = ids[: self.max_length + 1]
            else:
                dropped = len(ids) - (self.max_length + 1)
                ids, prompt_len = ids[dropped:], max(0, prompt_len - dropped)
        inputs, labels = ids[:-1], list(ids[1:])
        if self.mask_prompt:
            # labels[t] predicts ids[t + 1]: the first response token is predicted at t = prompt_len - 1
            n_masked = max(0, prompt_len - 1)
            labels[:n_masked] = [IGNORE_INDEX] * min(n_masked, len(labels))
        return inputs, labels

    def __call__(self, items: list[TokenizedExample]) -> dict:
        pairs = [self.inputs_and_labels(item) for item in items]
        width = max(len(inputs) for inputs, _ in pairs)
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for inputs, labels in pairs:
            n_pad = width - len(inputs)
            rows = (inputs, labels, [1] * len(inputs))
            pads = ([self.pad_id] * n_pad, [IGNORE_INDEX] * n_pad, [0] * n_pad)
            for key, row, pad in zip(batch, rows, pads):
                batch[key].append(row + pad if self.padding_side == "right" else pad + row)
        return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}


# ---------------------------------------------------------------- batching

class LengthGroupedBatches:
    """Batches of similar-length examples, so little compute goes to padding; shuffled per epoch.

    Indices are shuffled with ``seed + epoch``, cut into groups of ``batch_size * group_factor``, sorted by
    length inside each group, batched, and the batches shuffled. With ``shuffle=False`` (evaluation) the
    examples are not shuffled, but the batch order still is, with a fixed seed: the same order every time, and
    the first few batches (an evaluation capped at N batches) are a fair sample rather than the shortest examples.
    ``rank``/``world_size`` give each process of a distributed run its own share of the batches.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 123, shuffle: bool = True,
                 group_factor: int = 50, drop_last: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_factor = group_factor
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed + self.epoch if self.shuffle else self.seed)
        if self.shuffle:
            rng.shuffle(order)
        group = self.batch_size * self.group_factor
        batches = []
        for start in range(0, len(order), group):
            chunk = sorted(order[start:start + group], key=lambda i: self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(batches)  # without shuffle, rng is seeded by seed alone: a fixed order
        return batches[self.rank::self.world_size]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


class EpochShuffledBatches(LengthGroupedBatches):
    """Plain shuffled batches (no length grouping), reproducible per epoch: for fixed-length windows."""

    def __init__(self, n_items: int, batch_size: int, seed: int = 123, shuffle: bool = True, **kwargs):
        super().__init__([0] * n_items, batch_size, seed=seed, shuffle=shuffle, group_factor=1, **kwargs)


def instruction_loader(examples: list[Example], batch_size: int, max_length: int, shuffle: bool = True,
                       mask_prompt: bool = True, truncation: str = "right", seed: int = 123,
                       group_by_length: bool = True, tokenizer: Tokenizer = GPT2) -> DataLoader:
    """A DataLoader of padded instruction batches (see :class:`InstructionCollator`).

    Pass the model's tokenizer (``model.tokenizer``) when it is not GPT-2's; padding uses its end-of-text id.
    """
    dataset = InstructionDataset(examples, tokenizer)
    lengths = dataset.lengths() if group_by_length else [0] * len(dataset)
    sampler = LengthGroupedBatches(lengths, batch_size, seed=seed, shuffle=shuffle)
    collate = InstructionCollator(max_length, mask_prompt=mask_prompt, truncation=truncation,
                                  pad_id=tokenizer.eot_id)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


def window_loader(token_ids, length: int, batch_size: int, stride: int | None = None,
                  shuffle: bool = True, seed: int = 123) -> DataLoader:
    """A DataLoader of pretraining windows over a token stream."""
    dataset = TokenWindows(token_ids, length, stride)
    sampler = EpochShuffledBatches(len(dataset), batch_size, seed=seed, shuffle=shuffle)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_windows)


class ReplayLoader:
    """Fine-tuning batches that each carry a few windows of pretraining text as well (see :func:`with_replay`).

    Iterates like ``loader`` (same length, same ``set_epoch``), adding to every batch ``replay_input_ids``,
    ``replay_labels`` and ``replay_weight`` from ``replay``. The replay windows of epoch ``e`` depend only on
    ``e`` and the batch's position, so a resumed run sees the same windows as an uninterrupted one.
    """

    def __init__(self, loader: DataLoader, replay: DataLoader, weight: float = 1.0):
        if len(replay) == 0:
            raise DataError("the replay text gave no windows: use more text or a shorter context length")
        self.loader, self.replay, self.weight = loader, replay, float(weight)
        self.batch_sampler = self  # train() calls set_epoch through here
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def _replay_batches(self):
        for cycle in itertools.count():  # a different order each time the replay text runs out
            self.replay.batch_sampler.set_epoch(self.epoch * 1_000_003 + cycle)
            yield from self.replay

    def __iter__(self):
        weight = torch.tensor(self.weight)
        for batch, extra in zip(self.loader, self._replay_batches()):
            yield {**batch, "replay_input_ids": extra["input_ids"], "replay_labels": extra["labels"],
                   "replay_weight": weight}


def with_replay(loader: DataLoader, token_ids, length: int, windows_per_batch: int = 1, weight: float = 1.0,
                seed: int = 123) -> ReplayLoader:
    """Mix pretraining text into fine-tuning: every batch of ``loader`` also trains on ``windows_per_batch``
    windows of ``length`` tokens from ``token_ids``, their loss weighted by ``weight``.

    Why: with tied embeddings, a token that never appears in any fine-tuning answer only ever gets the push
    "not this one" from the softmax, and AdamW turns even a tiny push, repeated at every step, into full-size
    updates: in notebook 05 every such row drifted to (nearly) the same vector, so the model could not tell those
    words apart or copy them. A little pretraining text keeps every token in its pretrained place.
    """
    replay = window_loader(token_ids, length, windows_per_batch, shuffle=True, seed=seed)
    return ReplayLoader(loader, replay, weight)


def padding_share(loader: DataLoader) -> float:
    """Fraction of the computed token positions that are padding, over one pass of the loader."""
    total = real = 0
    for batch in loader:
        total += batch["attention_mask"].numel()
        real += int(batch["attention_mask"].sum())
    return 1 - real / total if total else 0.0
