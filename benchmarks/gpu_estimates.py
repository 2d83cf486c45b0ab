"""Estimated training minutes of the notebooks on GPUs, from FLOPs: estimates, not measurements.

    python benchmarks/gpu_estimates.py

No GPU was at hand to measure the notebooks on, so this computes each notebook's training work from its recipe
(optimizer steps, examples per step, and the tokens per example counted on the real data with the model's own
tokenizer), in FLOPs (``bench_vs_hf.step_flops``: 6 per weight per token, plus attention), and turns it into time
two ways, keeping the larger:

- compute: FLOPs / (a GPU's peak 16-bit tensor-core rate x ``--utilization``; T4 65 TFLOP/s in fp16, which it
  trains in under ``precision="auto"``; A100 312 TFLOP/s in bf16);
- overhead: optimizer steps x the time the CPU takes to issue one step's operations, measured here on a model of
  the same structure with tiny tensors (a GPU waits for its CPU when the model is this small).

To check the FLOP count, the same work is also turned into CPU time at the fp32 rate measured here on a real step
of the same model; the README's device table puts that beside the measured notebook times. Evaluation passes are
counted (forward only); generating answers and everything else a notebook does are not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_vs_hf import step_flops  # noqa: E402

from gptlib import GPTModel, TrainConfig, preset, train, window_loader  # noqa: E402
from gptlib.instructions import Example, format_example, load_jsonl  # noqa: E402
from gptlib.tokenizer import GPT2  # noqa: E402

GPUS = {"T4 (fp16)": 65e12, "A100 (bf16)": 312e12}


def mean_tokens(examples, tokenizer, shared_header: bool = True) -> float:
    """Mean positions a training example costs: its tokens, less the prompt header that a batch computes once."""
    lengths = [sum(len(tokenizer.encode(part)) for part in format_example(e)) for e in examples]
    header = len(tokenizer.encode(format_example(Example("x", "", "y"))[0].split("x")[0])) if shared_header else 0
    return statistics.mean(lengths) - header


def workloads(workbook_tokenizer) -> list[dict]:
    """Each notebook's training, as its cells run it at full size (steps at most, where early stopping may cut)."""
    from gptlib.tasks import generate_examples
    tiny, gpt2 = preset("tiny", vocab_size=workbook_tokenizer.vocab_size), preset("gpt2-124m")
    tasks = [Example(r["instruction"], r["input"], r["output"]) for r in generate_examples(300, seed=0)]
    pairs = load_jsonl(ROOT / "dataset" / "sarcasm" / "sarcasm_instruction_pairs.jsonl")
    answers = [Example("", "", p.response) for p in pairs]  # notebook 08 classifies answers
    t05, t05g = mean_tokens(tasks, workbook_tokenizer), mean_tokens(tasks, GPT2)
    t07, t07g = mean_tokens(pairs, workbook_tokenizer), mean_tokens(pairs, GPT2)
    t08 = mean_tokens(answers, workbook_tokenizer, shared_header=False)
    lora = 4 / 6  # LoRA skips the frozen weights' gradients: about two thirds of a full step's FLOPs
    return [
        # 04: 1,800 steps of 16 windows of 128 tokens; 13 evaluations of 8 training and 8 validation batches
        dict(notebook="04", model="workbook", config=tiny, steps=1800,
             parts=[(1800, 16, 128, 1.0), (13 * 16, 16, 128, 1 / 3)]),
        # 05: 22,000 steps of 16 task examples and 2 windows of 128 tokens; 23 evaluations of 10 validation batches
        dict(notebook="05", model="workbook", config=tiny, steps=22_000,
             parts=[(22_000, 16, t05, 1.0), (22_000, 2, 128, 1.0), (23 * 10, 16, t05, 1 / 3)]),
        dict(notebook="05", model="GPT-2 124M", config=gpt2, steps=6_000,
             parts=[(6_000, 16, t05g, 1.0), (6_000, 2, 128, 1.0), (7 * 10, 16, t05g, 1 / 3)]),
        # 07: at most 8 epochs of 72 batches of 8 (early stopping cut it to 500 steps in the full run), then three
        # LoRA runs of as many steps; evaluations every 25 steps of 20 batches
        dict(notebook="07", model="workbook", config=tiny, steps=4 * 500,
             parts=[(500, 8, t07, 1.0), (3 * 500, 8, t07, lora), (4 * 20 * 20, 8, t07, 1 / 3)]),
        dict(notebook="07", model="GPT-2 124M", config=gpt2, steps=4 * 576,
             parts=[(576, 8, t07g, 1.0), (3 * 576, 8, t07g, lora), (4 * 23 * 20, 8, t07g, 1 / 3)]),
        # 08: three classifiers and the judge, each at most 6 epochs of 72 batches of 16 answers
        dict(notebook="08", model="workbook", config=tiny, steps=4 * 6 * 72, parts=[(4 * 6 * 72, 16, t08, 1.0)]),
    ]


def step_seconds(config, batch: int, tokens: int, steps: int = 6) -> float:
    """Median time of an fp32 training step of ``config`` in gptlib's training loop on this CPU (the notebooks'
    loop), on windows of random tokens."""
    torch.manual_seed(0)
    model = GPTModel(config)
    ids = torch.randint(0, config.vocab_size, (batch * (steps + 1) * tokens + 1,))
    stamps = []
    train(model, window_loader(ids, tokens, batch), cfg=TrainConfig(
        max_steps=steps, lr=1e-4, eval_every=10**9, eval_batches=1, progress=False, device="cpu", precision="fp32"),
        on_step=lambda step, loss: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def issue_seconds(config) -> float:
    """The CPU's time to issue one training step's operations: the same structure, tensors too small to matter."""
    tiny_tensors = preset("tiny", vocab_size=64, emb_dim=2 * config.n_heads, n_heads=config.n_heads,
                          n_layers=config.n_layers, context_length=8, tie_weights=config.tie_weights,
                          qkv_bias=config.qkv_bias)
    return step_seconds(tiny_tensors, 1, 8, steps=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utilization", type=float, default=0.25,
                        help="share of a GPU's peak 16-bit rate a training step reaches (0.25)")
    args = parser.parse_args()
    from gptlib.workbook import workbook_tokenizer
    rows = workloads(workbook_tokenizer())
    cpu_rate, issue = {}, {}
    for row in rows:
        name = row["model"]
        if name not in cpu_rate:
            batch, tokens = (16, 128) if name == "workbook" else (4, 128)
            cpu_rate[name] = step_flops(row["config"], batch, tokens) / step_seconds(row["config"], batch, tokens)
            issue[name] = issue_seconds(row["config"])
    print("fp32 training rate on this CPU, gptlib's loop: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in cpu_rate.items()))
    print("time to issue one training step's operations: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in issue.items()))
    print(f"GPU compute at {args.utilization:.0%} of peak; estimates, not measurements\n")
    header = f"{'notebook':9}{'model':12}{'steps':>8}{'PFLOP':>8}{'CPU min':>9}" + "".join(f"{g:>14}" for g in GPUS)
    print(header + "   (minutes of training)")
    for row in rows:
        flops = sum(steps * step_flops(row["config"], batch, round(tokens)) * share
                    for steps, batch, tokens, share in row["parts"])
        steps = row["steps"]
        gpu = [max(flops / (peak * args.utilization), steps * issue[row["model"]]) / 60 for peak in GPUS.values()]
        print(f"{row['notebook']:9}{row['model']:12}{steps:>8,}{flops / 1e15:>8.2f}{flops / cpu_rate[row['model']] / 60:>9.1f}"
              + "".join(f"{m:>14.1f}" for m in gpu))


if __name__ == "__main__":
    main()
