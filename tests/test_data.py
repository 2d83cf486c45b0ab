import torch

from gptlib import Example, InstructionCollator, TokenWindows, instruction_loader, window_loader
from gptlib.data import LengthGroupedBatches, padding_share, tokenize_example
from gptlib.model import IGNORE_INDEX
from gptlib.tokenizer import EOT_ID, encode


def test_windows_are_shifted_by_one_and_follow_the_stride():
    windows = TokenWindows(list(range(20)), length=4, stride=3)
    x, y = windows[1]
    assert x.tolist() == [3, 4, 5, 6] and y.tolist() == [4, 5, 6, 7]
    assert len(windows) == 6  # starts 0, 3, ..., 15: every window has its shifted target


def test_collator_masks_prompt_and_padding():
    short = tokenize_example(Example("Hi", "", "Yo"))
    long = tokenize_example(Example("Say something longer please", "with input", "A longer answer here"))
    batch = InstructionCollator(max_length=256)([short, long])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(long.ids) - 1)  # padded to the longest
    row = batch["labels"][0]
    n_real = len(short.ids) - 1
    # prompt positions and padding take no loss; the response (and its <|endoftext|>) does
    assert (row[: short.prompt_len - 1] == IGNORE_INDEX).all()
    assert row[short.prompt_len - 1: n_real].tolist() == short.ids[short.prompt_len:]
    assert row[n_real - 1] == EOT_ID
    assert (row[n_real:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].tolist() == [1] * n_real + [0] * (len(long.ids) - 1 - n_real)
    assert (batch["input_ids"][0, n_real:] == EOT_ID).all()


def test_prompt_masking_can_be_turned_off():
    item = tokenize_example(Example("Hi", "", "Yo"))
    labels = InstructionCollator(256, mask_prompt=False)([item])["labels"][0]
    assert labels.tolist() == item.ids[1:]


def test_truncation_right_and_left():
    item = tokenize_example(Example("Tell me a story", "", "Once upon a time there was a cat"))
    right = InstructionCollator(max_length=10, truncation="right")([item])
    assert right["input_ids"][0].tolist() == item.ids[:10]
    left = InstructionCollator(max_length=10, truncation="left")([item])
    assert left["input_ids"][0].tolist() == item.ids[-11:-1]
    assert left["labels"][0].tolist()[-1] == EOT_ID  # the answer's end survives left truncation
    # every response token is still labelled; the prompt's remaining tokens are not
    n_response = len(item.ids) - item.prompt_len
    assert int((left["labels"][0] != IGNORE_INDEX).sum()) == n_response


def test_left_padding_lines_up_the_ends():
    a, b = tokenize_example(Example("Hi", "", "Yo")), tokenize_example(Example("Hello there friend", "", "Yo"))
    batch = InstructionCollator(256, padding_side="left")([a, b])
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert batch["input_ids"][0, -1] == batch["input_ids"][1, -1]


def test_length_grouping_reduces_padding_and_keeps_every_example():
    examples = [Example(f"Repeat {' '.join(['word'] * (i % 40))}", "", "ok") for i in range(400)]
    grouped = instruction_loader(examples, batch_size=8, max_length=256, seed=1)
    plain = instruction_loader(examples, batch_size=8, max_length=256, seed=1, group_by_length=False)
    assert padding_share(grouped) < padding_share(plain) / 3
    seen = sorted(i for batch in grouped.batch_sampler for i in batch)
    assert seen == list(range(400))


def test_batches_are_reproducible_per_epoch_and_split_across_ranks():
    sampler = LengthGroupedBatches(list(range(100)), batch_size=4, seed=7)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    ranks = [LengthGroupedBatches(list(range(100)), 4, seed=7, rank=r, world_size=2) for r in (0, 1)]
    assert sorted(i for r in ranks for b in r for i in b) == list(range(100))


def test_window_loader_batches():
    loader = window_loader(encode("hello world " * 100), length=16, batch_size=4)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 16)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])


def test_unshuffled_batches_are_fixed_but_not_sorted_by_length():
    lengths = list(range(1000))  # example i has length i
    sampler = LengthGroupedBatches(lengths, batch_size=10, shuffle=False)
    first = list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) == first  # evaluation order never changes
    # a capped evaluation (first 5 batches) sees examples from across the length range, not just the shortest
    sampled = [i for batch in first[:5] for i in batch]
    assert max(sampled) - min(sampled) > 300
    assert all(max(b) - min(b) < 50 for b in first)  # each batch still holds similar lengths
