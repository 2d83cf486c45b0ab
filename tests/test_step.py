"""A batch cut into processes' shares and micro-batches adds up to the whole batch: loss and gradients."""

import copy

import pytest
import torch

from gptlib import Example, GPTModel, instruction_loader, with_replay
from gptlib.classify import GPTClassifier, LabelledText, classification_loader, choose_trainable
from gptlib.step import StepLoss, every_row, pieces
from gptlib.tokenizer import GPT2

from conftest import tiny_config


def instruction_batch(n=7, seed=0):
    """A batch of instruction examples of different lengths: prompt masking and padding give each row its own
    number of labelled tokens."""
    examples = [Example(f"Repeat the word {i} times.", "", " ".join(["cat"] * (1 + 3 * i))) for i in range(n)]
    loader = instruction_loader(examples, batch_size=n, max_length=64, shuffle=False, seed=seed)
    return next(iter(loader))


def shares(size):
    """The rows functions of ``size`` processes (as World.rows: every size-th row from the rank)."""
    return [lambda n, r=rank: range(r, n, size) for rank in range(size)]


def weighted_loss_and_grads(model, micro_batches):
    """The sum of the pieces' weighted losses, and of their gradients, as the training step accumulates them."""
    model.zero_grad()
    total = 0.0
    for micro in micro_batches:
        loss = StepLoss(model)(micro)
        loss.backward()
        total += loss.item()
    return total, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_as_whole(model, batch, processes, micro_batch_size):
    whole_loss, whole_grads = weighted_loss_and_grads(model, pieces(batch))
    total, grads = 0.0, {}
    for rows in shares(processes):
        loss, g = weighted_loss_and_grads(model, pieces(batch, rows, micro_batch_size))
        total += loss
        for name, grad in g.items():
            grads[name] = grads.get(name, 0) + grad
    assert total == pytest.approx(whole_loss, rel=1e-5)
    assert grads.keys() == whole_grads.keys()
    for name, grad in whole_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("processes, micro_batch_size", [(1, 2), (2, None), (3, None), (3, 1), (2, 3)])
def test_shares_and_micro_batches_add_up_to_the_whole_batch(processes, micro_batch_size):
    torch.manual_seed(0)
    model = GPTModel(tiny_config(context_length=64))
    batch = instruction_batch()
    counts = (batch["labels"] != -100).sum(1)
    assert len(set(counts.tolist())) > 3  # rows really differ in how many tokens they teach
    assert_same_as_whole(model, batch, processes, micro_batch_size)


def test_a_replay_part_is_weighted_on_its_own():
    torch.manual_seed(0)
    model = GPTModel(tiny_config(context_length=64))
    examples = [Example(f"Say {i}.", "", "yes " * (i + 1)) for i in range(6)]
    loader = instruction_loader(examples, batch_size=6, max_length=64, shuffle=False)
    text_ids = GPT2.encode(" ".join(f"word{i}" for i in range(400)))
    batch = next(iter(with_replay(loader, text_ids, length=16, windows_per_batch=3, weight=0.5)))
    whole, _ = weighted_loss_and_grads(model, pieces(batch))
    plain = model.loss(batch["input_ids"], batch["labels"]) + 0.5 * model.loss(batch["replay_input_ids"],
                                                                                 batch["replay_labels"])
    assert whole == pytest.approx(plain.item(), rel=1e-6)
    assert_same_as_whole(model, batch, processes=2, micro_batch_size=2)


def test_a_whole_batch_on_one_process_is_passed_as_it_is():
    batch = instruction_batch()
    (micro,) = pieces(batch, every_row)
    (piece,) = micro
    assert piece["input_ids"] is batch["input_ids"] and piece["labels"] is batch["labels"]
    assert piece["weight"].item() == 1.0


def test_each_share_is_padded_only_to_its_own_longest_row():
    batch = instruction_batch()
    lengths = batch["attention_mask"].sum(1)
    for rows in shares(3):
        for micro in pieces(batch, rows, micro_batch_size=1):
            (piece,) = micro
            assert piece["input_ids"].shape[1] == int(piece["attention_mask"].sum())
    assert int(lengths.min()) < batch["input_ids"].shape[1]


def test_rows_without_labels_or_no_rows_still_reach_every_weight_with_zero_gradient():
    """DistributedDataParallel waits for every process's gradients, so a process with nothing to learn this step
    must still run a backward pass that gives each trainable weight a (zero) gradient."""
    torch.manual_seed(0)
    model = GPTModel(tiny_config(context_length=64))
    batch = instruction_batch(n=2)
    idle = lambda n: range(0)  # noqa: E731 - a process whose share of this batch is empty
    for micro_batches in (pieces(batch, idle), pieces({**batch, "labels": torch.full_like(batch["labels"], -100)})):
        (micro,) = micro_batches
        loss, grads = weighted_loss_and_grads(model, micro_batches)
        assert loss == 0.0 and micro[0]["labels"] is None
        assert set(grads) == {name for name, p in model.named_parameters() if p.requires_grad}
        assert all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_a_classifier_batch_is_shared_by_texts():
    torch.manual_seed(0)
    gpt = GPTModel(tiny_config(context_length=64))
    model = GPTClassifier.from_gpt(gpt, ["no", "yes"])
    choose_trainable(model, "all")
    texts = [LabelledText(f"text number {i} " * (i + 1), i % 2) for i in range(7)]
    batch = next(iter(classification_loader(texts, GPT2, batch_size=7, max_length=64, shuffle=False)))
    assert_same_as_whole(copy.deepcopy(model), batch, processes=3, micro_batch_size=None)
    # the LM head plays no part in a classifier's loss, so it must not train (DDP would wait for its gradient)
    assert not model.out_head.weight.requires_grad and model.cls_head.weight.requires_grad
