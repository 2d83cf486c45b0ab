"""The loss of one training batch, cut into pieces that add up to it: this process's rows, in micro-batches.

A batch's loss is the mean over its labelled tokens (over its texts, for a classifier). When several processes
share the batch (see :mod:`gptlib.distributed`), or one process runs it a few rows at a time because the whole
batch does not fit (``micro_batch_size``), each piece's mean loss is weighted by its share of the batch's labelled
tokens, so the pieces' weighted losses add up to the whole batch's loss, and their gradients to its gradient: a
step sees the same examples, and takes the same step, however many processes and micro-batches made it.

A batch is a dict of (rows, ...) tensors: ``input_ids``, ``labels`` and usually ``attention_mask``. A batch from
:func:`~gptlib.data.with_replay` also holds a second part, ``replay_input_ids`` and ``replay_labels``, whose mean
loss counts ``replay_weight`` times: each part is weighted on its own.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .model import IGNORE_INDEX

PARTS = {"": None, "replay_": "replay_weight"}  # key prefix of each part of a batch -> the key of its loss weight


class StepLoss(nn.Module):
    """The weighted loss of one micro-batch (a list of pieces from :func:`pieces`), as a module: the computation
    each training step runs, and what DistributedDataParallel wraps (its gradient hooks are armed by a call of the
    wrapped module's forward, so the step must go through one)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, micro_batch: list[dict]) -> torch.Tensor:
        total = 0.0
        for piece in micro_batch:
            if piece["labels"] is None:  # nothing to learn in these rows: a zero that still reaches every weight
                loss = self.model(piece["input_ids"]).float().sum() * 0.0
            else:
                loss = self.model.loss(piece["input_ids"], piece["labels"], piece.get("attention_mask"))
            total = total + piece["weight"] * loss
        return total


def labelled(batch: dict, prefix: str = "") -> int:
    """How many positions of one part of ``batch`` have a label (for a classifier: how many texts)."""
    return int((batch[prefix + "labels"] != IGNORE_INDEX).sum())


def label_count(batch: dict) -> int:
    """Labelled positions in every part of ``batch``: the tokens (or texts) the step learns from."""
    return sum(labelled(batch, prefix) for prefix in PARTS if prefix + "labels" in batch)


def every_row(n_rows: int) -> range:
    """All rows: the share of the only process there is."""
    return range(n_rows)


def pieces(batch: dict, rows=every_row, micro_batch_size: int | None = None, scale: float = 1.0) -> list[list[dict]]:
    """This process's micro-batches of ``batch``: ``rows(n)`` of each part's n rows (see ``World.rows``), at most
    ``micro_batch_size`` rows at a time. A micro-batch is a list of pieces, one per part, each with its ``weight``:
    ``scale`` times its part's weight times its share of the part's labelled positions, so that the weighted losses
    of all the pieces of all the processes add up to ``scale`` times the loss of the whole batch.

    Rows with no label anywhere, or no rows at all, give one piece with ``labels`` None and weight 0: the process
    still runs a forward and a backward pass (DistributedDataParallel waits for every process's gradients).
    """
    by_part = []
    for prefix, weight_key in PARTS.items():
        if prefix + "labels" not in batch:
            continue
        part_weight = float(batch[weight_key]) if weight_key else 1.0
        total = labelled(batch, prefix)
        n_rows = len(batch[prefix + "input_ids"])
        mine = rows(n_rows)
        size = micro_batch_size or max(1, len(mine))
        chunks = []
        for start in range(0, len(mine), size):
            piece = _select(batch, prefix, mine[start:start + size], n_rows)
            n = labelled(piece)
            if n > 0:
                chunks.append({**piece, "weight": torch.tensor(scale * part_weight * n / total)})
        by_part.append(chunks)
    micro = [[piece for piece in group if piece is not None] for group in itertools.zip_longest(*by_part)]
    if not micro:
        micro = [[{"input_ids": batch["input_ids"][:1], "labels": None, "weight": torch.tensor(0.0)}]]
    return micro


def _select(batch: dict, prefix: str, rows: range, n_rows: int) -> dict:
    """``rows`` of one part of ``batch`` as a piece (input_ids, labels, attention_mask), padding trimmed to the
    longest of those rows."""
    piece = {name: batch[prefix + name] for name in ("input_ids", "labels", "attention_mask")
             if prefix + name in batch}
    if rows != range(n_rows):
        index = torch.as_tensor(list(rows), dtype=torch.long)
        piece = {name: tensor[index] for name, tensor in piece.items()}
    mask = piece.get("attention_mask")
    if mask is not None and mask.dim() == 2 and bool((mask[:, 1:] <= mask[:, :-1]).all()):  # right padding
        width = int(mask.sum(1).max())
        if width < mask.shape[1]:  # columns of padding only: nothing in them counts, so drop them
            piece = {name: tensor[:, :width] if tensor.dim() == 2 else tensor for name, tensor in piece.items()}
    return piece


def batch_loss(model: nn.Module, batch: dict, device) -> tuple[torch.Tensor, int]:
    """The mean loss of a whole batch on ``device`` (``replay_weight`` times the replay part's added), and how
    many positions had a label."""
    (micro,) = pieces(batch)
    micro = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in p.items()} for p in micro]
    return StepLoss(model)(micro), label_count(batch)
