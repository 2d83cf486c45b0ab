"""The workbook's recipe (notebook 04's pretraining, then notebook 05's fine-tune) with only the vocabulary changed.

    python benchmarks/compare_vocab.py                         # vocabulary 2048: about 27 minutes on a 2-core CPU
    python benchmarks/compare_vocab.py --base checkpoints/pretrained.pth --seed 7   # only the fine-tune
    python benchmarks/compare_vocab.py --vocab 4096 --add-copies 1

Prints one JSON line after pretraining (seconds, validation bits per character, tokens per character) and one per
scoring point of the fine-tune (exact match per task on notebook 05's 2,100 test examples, and on the examples made
only of words never trained on). This is how the workbook's vocabulary size was chosen (README, "Tokenizers").
Run it alone: two trainings at once on a 2-core CPU make each one's timings meaningless.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from gptlib import (Example, GPTModel, TrainConfig, answer_instructions, exact_match, instruction_loader, load_model,
                    preset, save_checkpoint, set_seed, split_examples, train, window_loader, with_replay)
from gptlib.evaluate import bits_per_character
from gptlib.tasks import corpus_words, generate_examples, load_common_words, split_words
from gptlib.workbook import project_root, workbook_tokenizer


def pretrain(vocab: int, steps: int) -> GPTModel:
    """Notebook 04: the tiny model on the training plays, 16 x 128 tokens per step, fp32."""
    root = project_root() / "dataset/pretraining"
    train_text = (root / "shakespeare_train.txt").read_text(encoding="utf-8")
    val_text = (root / "shakespeare_val.txt").read_text(encoding="utf-8")
    tokenizer = workbook_tokenizer(vocab)
    train_ids, val_ids = tokenizer.encode(train_text), tokenizer.encode(val_text)
    set_seed(123)
    model = GPTModel(preset("tiny", vocab_size=vocab), tokenizer=tokenizer)
    context = model.config.context_length
    result = train(model, window_loader(train_ids, context, 16, seed=123),
                   window_loader(val_ids, context, 16, shuffle=False),
                   TrainConfig(max_steps=steps, lr=2e-3, warmup_steps=100, weight_decay=0.1, eval_every=steps,
                               eval_batches=8, seed=123, precision="fp32", progress=False))
    print(json.dumps({"vocab": vocab, "pretrain_steps": steps, "pretrain_seconds": round(result.seconds),
                      "val_bits_per_char": round(bits_per_character(model, val_ids), 3),
                      "tokens_per_char": round(len(val_ids) / len(val_text), 3)}), flush=True)
    return model


def finetune(model: GPTModel, steps: int, seed: int, add_copies: int) -> None:
    """Notebook 05: the task set (common words minus the unseen tenth, plus the plays' words, with more long sorts),
    replay, 16 per step."""
    def example(row):
        return Example(row["instruction"], row["input"], row["output"])

    train_words, unseen_words = split_words(load_common_words(), unseen_share=0.1, seed=0)
    split = split_examples(generate_examples(n_per_task=3000, seed=0, words=train_words), seed=123)
    test_rows = split.test
    unseen_rows = [r for r in generate_examples(100, seed=99, words=unseen_words) if r["task"] != "add"]
    plays = (project_root() / "dataset/pretraining/shakespeare_train.txt").read_text(encoding="utf-8")
    play_words = corpus_words(plays, 10, unseen_words)
    held_out = {(r["instruction"], r["input"]) for r in split.val + split.test}
    keep = random.Random(5)  # half the repeat and last-word examples, and only sorts of 4 to 6 words (notebook 05)
    extra = [r for r in generate_examples(n_per_task=6000, seed=1, words=play_words)
             if (r["instruction"], r["input"]) not in held_out
             and not (r["task"] in ("repeat", "last_word") and keep.random() < 0.5)
             and not (r["task"] == "sort" and len(r["input"].split()) < 4)]
    taken = held_out | {(r["instruction"], r["input"]) for r in extra}
    long_sorts = [r for r in generate_examples(n_per_task=8000, seed=2, tasks=("sort",), words=play_words)
                  if len(r["input"].split()) >= 4 and (r["instruction"], r["input"]) not in taken]
    additions = [r for r in split.train + extra if r["task"] == "add"]
    rows = split.train + extra + long_sorts + additions * (add_copies - 1)
    tokenizer, context = model.tokenizer, model.config.context_length
    set_seed(seed)
    tasks = instruction_loader([example(r) for r in rows], batch_size=16, max_length=context, seed=seed,
                               tokenizer=tokenizer)
    loader = with_replay(tasks, tokenizer.encode(plays), length=context, windows_per_batch=2, seed=seed)

    def score(rows):
        answers = answer_instructions(model, [(r["instruction"], r["input"]) for r in rows], max_new_tokens=24)
        by_task: dict[str, list[bool]] = {}
        for row, answer in zip(rows, answers):
            by_task.setdefault(row["task"], []).append(exact_match(answer, row["output"]))
        overall = 100 * sum(sum(v) for v in by_task.values()) / len(rows)
        return round(overall, 1), {task: round(100 * sum(v) / len(v), 1) for task, v in sorted(by_task.items())}

    started = time.perf_counter()

    def report(step, loss):
        if step in (steps // 2, steps):
            model.eval()
            (overall, per_task), (unseen, unseen_per_task) = score(test_rows), score(unseen_rows)
            model.train()
            print(json.dumps({"vocab": tokenizer.vocab_size, "step": step, "seed": seed, "add_copies": add_copies,
                              "minutes": round((time.perf_counter() - started) / 60, 1), "overall": overall,
                              "unseen": unseen, "per_task": per_task, "unseen_per_task": unseen_per_task}), flush=True)

    train(model, loader, None, TrainConfig(max_steps=steps, lr=3e-3, warmup_steps=100, weight_decay=0.1,
                                           precision="fp32", seed=seed, progress=False), on_step=report)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, help="BPE vocabulary size to pretrain with (default 2048, the "
                        "workbook's); not with --base, whose checkpoint carries its own tokenizer")
    parser.add_argument("--pretrain-steps", type=int, default=1800, help="notebook 04's steps (default 1800)")
    parser.add_argument("--finetune-steps", type=int, default=22000, help="notebook 05's steps (default 22000)")
    parser.add_argument("--seed", type=int, default=123, help="fine-tuning batch order (notebook 05's SEED)")
    parser.add_argument("--add-copies", type=int, default=2,
                        help="how many times each addition example is shown (notebook 05: 2)")
    parser.add_argument("--base", type=Path, help="skip pretraining: fine-tune this checkpoint (e.g. notebook 04's)")
    parser.add_argument("--out", type=Path, help="also save the fine-tuned model here")
    args = parser.parse_args(argv)
    if args.base and args.vocab is not None:
        parser.error("--vocab and --base do not go together: the --base checkpoint's tokenizer sets the vocabulary")
    if args.base:
        model, _ = load_model(args.base)
    else:
        model = pretrain(args.vocab or 2048, args.pretrain_steps)
    finetune(model, args.finetune_steps, args.seed, args.add_copies)
    if args.out:
        save_checkpoint(args.out, model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
