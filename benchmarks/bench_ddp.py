"""Training throughput with 1 and 2 processes (torchrun, DistributedDataParallel over gloo), and what the gradient
all-reduce costs.

    python benchmarks/bench_ddp.py                         # tiny (the workbook's size), batch 16 x 128
    python benchmarks/bench_ddp.py --config seed-small --batch-size 8 --steps 12

Each run trains with gptlib's own loop (``gptlib.train`` with the world ``gptlib.distributed.session`` gives) on
windows of random tokens, the same --batch-size examples per optimizer step in every run, fp32:

- 1 process with all of the machine's threads (what `gptlib pretrain` does without torchrun): the reference;
- 1 process with 1 thread (what each torchrun process gets: torchrun sets OMP_NUM_THREADS=1);
- 2 processes of 1 thread each under `torchrun --standalone --nproc_per_node 2`.

Step times are medians over the steps after the first few. The all-reduce figure is the median time of
``dist.all_reduce`` on one fp32 tensor as large as all the gradients, in the 2-process group: about what DDP sends
each step (in 25 MB buckets, overlapped with the backward pass where it can be). On one machine the processes
share its cores, so expect no gain: torchrun is for more than one GPU or machine. Read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    """One measured run (possibly one process of several); rank 0 writes the result as JSON to --result."""
    import torch
    import torch.distributed as dist

    from gptlib import GPTModel, TrainConfig, preset, train, window_loader
    from gptlib.distributed import session

    if args.threads:
        torch.set_num_threads(args.threads)
    with session("cpu") as world:
        torch.manual_seed(0)
        config = preset(args.config, drop_rate=0.0, **({"vocab_size": args.vocab_size} if args.vocab_size else {}))
        model = GPTModel(config)
        n_windows = args.batch_size * (args.steps + 2)
        ids = torch.randint(0, config.vocab_size, (n_windows * config.context_length + 1,), generator=torch.Generator().manual_seed(1))
        loader = window_loader(ids, config.context_length, args.batch_size, seed=0)
        stamps = []
        train(model, loader, cfg=TrainConfig(max_steps=args.steps, lr=1e-4, eval_every=10**9, eval_batches=1,
                                             progress=False, device="cpu", precision="fp32"),
              world=world, on_step=lambda step, loss: stamps.append(time.perf_counter()))
        steps = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]
        result = {"processes": world.size, "threads": torch.get_num_threads(), "parameters": model.num_parameters(),
                  "step_seconds": statistics.median(steps),
                  "tokens_per_second": args.batch_size * config.context_length / statistics.median(steps)}
        if world.distributed:
            grads = torch.zeros(model.num_parameters(trainable_only=True))
            times = []
            for _ in range(12):
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(grads)
                times.append(time.perf_counter() - start)
            result["all_reduce_seconds"] = statistics.median(times[2:])
            result["gradient_mb"] = grads.numel() * 4 / 1e6
        if world.is_main:
            Path(args.result).write_text(json.dumps(result))


def run(args, processes: int, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        argv = [__file__, "--worker", "--result", str(result), "--config", args.config,
                "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                *(["--vocab-size", str(args.vocab_size)] if args.vocab_size else []),
                *(["--threads", str(threads)] if threads else [])]
        if processes > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(processes), *argv]
        else:
            command = [sys.executable, *argv]
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        subprocess.run(command, check=True, capture_output=True, text=True, env=env)
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="model preset (tiny)")
    parser.add_argument("--vocab-size", type=int, help="override the preset's vocabulary (tiny: 2048, the workbook's)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step, in every run (16)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (30)")
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the median (4)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.config == "tiny" and args.vocab_size is None:
        args.vocab_size = 2048
    runs = {"1 process, all threads": run(args, 1, None), "1 process, 1 thread": run(args, 1, 1),
            "2 processes (torchrun), 1 thread each": run(args, 2, None)}
    if args.json:
        print(json.dumps(runs, indent=2))
        return
    reference = runs["1 process, all threads"]["tokens_per_second"]
    print(f"{args.config} (vocab {args.vocab_size or 'preset'}), batch {args.batch_size} per optimizer step, fp32, "
          f"median of {args.steps - args.warmup - 1} steps")
    print(f"{'':40}{'tokens/s':>10}{'ms/step':>10}{'ratio':>8}")
    for name, r in runs.items():
        print(f"{name:40}{r['tokens_per_second']:>10,.0f}{r['step_seconds'] * 1000:>10.1f}"
              f"{r['tokens_per_second'] / reference:>7.2f}x")
    two = runs["2 processes (torchrun), 1 thread each"]
    print(f"all-reduce of the {two['gradient_mb']:.1f} MB of gradients (gloo, 2 processes): "
          f"{two['all_reduce_seconds'] * 1000:.1f} ms, {two['all_reduce_seconds'] / two['step_seconds']:.0%} of a "
          "2-process step")


if __name__ == "__main__":
    main()
