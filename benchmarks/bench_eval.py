"""Evaluation throughput: ``gptlib eval``'s answers one prompt at a time against batches, same checkpoint, same run.

    python benchmarks/bench_eval.py                      # notebook 05's checkpoint and test split
    python benchmarks/bench_eval.py --checkpoint PTH --data JSONL --split test --limit 700

Generates the greedy answers of the chosen examples with ``--batch-size 1`` (each prompt alone, as before batched
generation) and then with each larger batch size, checks that every answer is the same, and prints examples per
second and the speed-up. Defaults: ``checkpoints/instruct.pth`` and the ``checkpoints/tasks.jsonl`` that notebook 05
writes (run ``make run`` first), test split (2,100 examples), answers up to 24 tokens: exactly what notebook 05 scores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from gptlib import load_model, load_jsonl, split_examples
from gptlib.evaluate import score_answers

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "instruct.pth")
    parser.add_argument("--data", type=Path, default=ROOT / "checkpoints" / "tasks.jsonl")
    parser.add_argument("--split", choices=("all", "train", "val", "test"), default="test")
    parser.add_argument("--limit", type=int, help="score at most this many (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    args = parser.parse_args(argv)
    for path in (args.checkpoint, args.data):
        if not path.exists():
            print(f"error: {path} does not exist: run notebook 05 (make run) or pass --checkpoint/--data",
                  file=sys.stderr)
            return 2
    model, _ = load_model(args.checkpoint)
    model.eval()
    examples = load_jsonl(args.data)
    if args.split != "all":
        examples = getattr(split_examples(examples, seed=123), args.split)
    examples = examples[: args.limit]
    print(f"{args.checkpoint.name}: {model.num_parameters():,} parameters, {model.tokenizer.name}; "
          f"{len(examples)} examples, up to {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads")

    def run(batch_size: int):
        start = time.perf_counter()
        scores = score_answers(model, examples, args.max_new_tokens, batch_size=batch_size)
        return time.perf_counter() - start, scores

    base_seconds, base = run(1)
    answers = [p["prediction"] for p in base["predictions"]]
    print(f"| batch size | seconds | examples/s | speed-up | exact match | same answers |")
    print(f"|---:|---:|---:|---:|---:|:---:|")
    print(f"| 1 | {base_seconds:.1f} | {len(examples) / base_seconds:.1f} | 1.00x | {base['exact_match']:.1%} | - |")
    for batch_size in args.batch_sizes:
        seconds, scores = run(batch_size)
        same = [p["prediction"] for p in scores["predictions"]] == answers
        print(f"| {batch_size} | {seconds:.1f} | {len(examples) / seconds:.1f} | {base_seconds / seconds:.2f}x | "
              f"{scores['exact_match']:.1%} | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
