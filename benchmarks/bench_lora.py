"""Full fine-tuning against LoRA on one model config: trainable parameters, peak memory of a step, step time, file size.

    python benchmarks/bench_lora.py                      # seed-small, rank 8 on the attention projections
    python benchmarks/bench_lora.py --preset tiny --rank 4 --json
    python benchmarks/bench_lora.py --targets qkv,out_proj,fc,proj,emb --emb-alpha 4   # notebook 07's adapters

Each mode runs in a fresh process, so its peak resident memory (the kernel's ``ru_maxrss``) belongs to it alone:
the process builds the model, then takes ``--steps`` training steps on batches of the sarcasm pairs (batch 8, loss on
the responses, AdamW as `gptlib finetune` builds it). Memory is reported whole, and above the process's size before
the model was built (the interpreter and torch itself), which is what fine-tuning adds. Times are medians over the
steps after the first; they vary with the machine and its load, the ratios less so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux


def child(args) -> dict:
    """One mode, measured in this process."""
    import torch

    from gptlib import GPTModel, TrainConfig, instruction_loader, load_jsonl, preset, save_checkpoint
    from gptlib.lora import LoRAConfig, add_lora
    from gptlib.train import batch_loss, make_optimizer

    torch.manual_seed(0)
    before = rss_mb()
    if args.checkpoint:
        from gptlib import load_model
        model, _ = load_model(args.checkpoint, drop_rate=0.0)
    else:
        model = GPTModel(preset(args.preset, drop_rate=0.0))
    total = model.num_parameters()
    if args.mode == "lora":
        add_lora(model, LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, targets=tuple(args.targets.split(",")),
                                   emb_alpha=args.emb_alpha))
    trainable = model.num_parameters(trainable_only=True)
    examples = load_jsonl(ROOT / "dataset" / "sarcasm" / "sarcasm_instruction_pairs.jsonl")
    loader = instruction_loader(examples, args.batch_size, model.config.context_length, seed=0,
                                tokenizer=model.tokenizer)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4))
    model.train()
    times = []
    for step, batch in zip(range(args.steps), loader):
        start = time.perf_counter()
        loss, _ = batch_loss(model, batch, "cpu")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(Path(d) / "out.pth", model, optimizer)
        with_optimizer = (Path(d) / "out.pth").stat().st_size
        save_checkpoint(Path(d) / "out.pth", model)
        weights_only = (Path(d) / "out.pth").stat().st_size
    return {"mode": args.mode, "parameters": total, "trainable": trainable, "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_above_start_mb": round(peak_rss_mb() - before, 1),
            "step_seconds": round(statistics.median(times[1:] or times), 4),
            "file_bytes": weights_only, "file_with_optimizer_bytes": with_optimizer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="seed-small", help="model size, weights at random (seed-small)")
    parser.add_argument("--checkpoint", help="measure this checkpoint (and its tokenizer) instead of a preset")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="qkv,out_proj", help="as gptlib finetune --lora-targets (qkv,out_proj)")
    parser.add_argument("--emb-alpha", type=float, help="the embedding adapter's alpha, with emb in --targets")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--mode", choices=("full", "lora"), help=argparse.SUPPRESS)  # the measured child
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return
    results = {}
    for mode in ("full", "lora"):
        argv = [sys.executable, __file__, "--mode", mode, "--preset", args.preset, "--rank", str(args.rank),
                *(["--checkpoint", args.checkpoint] if args.checkpoint else []),
                "--targets", args.targets, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                *(["--emb-alpha", str(args.emb_alpha)] if args.emb_alpha is not None else [])]
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    full, lora = results["full"], results["lora"]
    summary = {"model": args.checkpoint or args.preset, "rank": args.rank, "targets": args.targets, "batch_size": args.batch_size,
               "full": full, "lora": lora,
               "trainable_share": lora["trainable"] / lora["parameters"],
               "peak_memory_ratio": lora["peak_above_start_mb"] / full["peak_above_start_mb"],
               "peak_rss_ratio": lora["peak_rss_mb"] / full["peak_rss_mb"],
               "step_time_ratio": lora["step_seconds"] / full["step_seconds"],
               "file_ratio": lora["file_bytes"] / full["file_bytes"]}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{summary['model']}, LoRA rank {args.rank} on {args.targets}, batch {args.batch_size}:")
    print(f"{'':28}{'full':>14}{'LoRA':>14}{'LoRA / full':>14}")
    rows = [("trainable parameters", full["trainable"], lora["trainable"], summary["trainable_share"] * 100, "%"),
            ("peak memory above start, MB", full["peak_above_start_mb"], lora["peak_above_start_mb"],
             summary["peak_memory_ratio"], "x"),
            ("peak memory whole, MB", full["peak_rss_mb"], lora["peak_rss_mb"], summary["peak_rss_ratio"], "x"),
            ("seconds per step", full["step_seconds"], lora["step_seconds"], summary["step_time_ratio"], "x"),
            ("checkpoint file, MB", full["file_bytes"] / 1e6, lora["file_bytes"] / 1e6, summary["file_ratio"] * 100,
             "%")]
    for name, a, b, ratio, unit in rows:
        print(f"{name:28}{a:>14,.3f}{b:>14,.3f}{ratio:>13.2f}{unit}" if isinstance(a, float) else
              f"{name:28}{a:>14,}{b:>14,}{ratio:>13.2f}{unit}")


if __name__ == "__main__":
    main()
