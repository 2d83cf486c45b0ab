"""`--compile` (``TrainConfig(compile=True)``) against the eager training step: time per step and time to compile.

    python benchmarks/bench_compile.py                  # three workloads, 40 steps each
    python benchmarks/bench_compile.py --steps 20 --only tiny-pretrain

Each run is a fresh process with an empty compiler cache (``TORCHINDUCTOR_CACHE_DIR`` in a new temporary folder),
so the compile time is what a user's first run pays. The run trains with gptlib's own loop, in fp32 (or bf16):

- ``tiny-pretrain``: the workbook's model (128 wide, 4 layers, its 2,048-token vocabulary), windows of 16 x 128
  (notebook 04's batches);
- ``tiny-finetune``: the same size with GPT-2's vocabulary on batches of 8 sarcasm pairs, whose lengths differ
  from batch to batch (as in notebooks 05 and 07), so the compiler meets new shapes;
- ``seed-small-pretrain``: the seed guide's 35M-parameter model, windows of 8 x 256.

"Step" is the median step after the first few; "compile" is the run's extra time over as many eager-speed steps
(the first steps compile, and new shapes compile again). Break-even is the number of steps after which the compiled
run has caught up; "never" where its steps are not faster. Read the ratios: the machine is shared.
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

WORKLOADS = {
    "tiny-pretrain": dict(config="tiny", vocab_size=2048, data="windows", batch_size=16),
    "tiny-finetune": dict(config="tiny", vocab_size=50257, data="sarcasm", batch_size=8),
    "seed-small-pretrain": dict(config="seed-small", vocab_size=50257, data="windows", batch_size=8),
}


def child(name: str, compile: bool, steps: int, precision: str) -> dict:
    import torch

    from gptlib import GPTModel, TrainConfig, instruction_loader, load_jsonl, preset, train, window_loader

    spec = WORKLOADS[name]
    torch.manual_seed(0)
    config = preset(spec["config"], drop_rate=0.0, vocab_size=spec["vocab_size"])
    model = GPTModel(config)
    if spec["data"] == "windows":
        ids = torch.randint(0, config.vocab_size, (spec["batch_size"] * (steps + 2) * config.context_length + 1,),
                            generator=torch.Generator().manual_seed(1))
        loader = window_loader(ids, config.context_length, spec["batch_size"], seed=0)
    else:
        examples = load_jsonl(ROOT / "dataset" / "sarcasm" / "sarcasm_instruction_pairs.jsonl")
        loader = instruction_loader(examples, spec["batch_size"], config.context_length, seed=0)
    stamps = []
    started = time.perf_counter()
    train(model, loader, cfg=TrainConfig(max_steps=steps, lr=1e-4, eval_every=10**9, eval_batches=1, compile=compile,
                                         progress=False, device="cpu", precision=precision),
          on_step=lambda step, loss: stamps.append(time.perf_counter()))
    step_times = [b - a for a, b in zip([started, *stamps], stamps)]
    return {"step_seconds": statistics.median(step_times[len(step_times) // 4:]), "total_seconds": stamps[-1] - started,
            "steps": steps}


def measure(name: str, compile: bool, steps: int, precision: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        argv = [sys.executable, __file__, "--child", name, "--steps", str(steps), "--precision", precision,
                *(["--compile"] if compile else [])]
        done = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (40)")
    parser.add_argument("--only", choices=list(WORKLOADS), action="append", help="run only this workload")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32 (the notebooks' on a CPU) or bf16 autocast (`--precision auto` on a CPU with "
                             "AVX-512 BF16 or AMX)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.compile, args.steps, args.precision)))
        return
    results = {}
    for name in args.only or WORKLOADS:
        eager, compiled = (measure(name, compile, args.steps, args.precision) for compile in (False, True))
        overhead = compiled["total_seconds"] - compiled["steps"] * eager["step_seconds"]
        gain = eager["step_seconds"] - compiled["step_seconds"]
        results[name] = {"eager": eager, "compiled": compiled, "step_ratio": compiled["step_seconds"] / eager["step_seconds"],
                         "compile_seconds": overhead, "break_even_steps": overhead / gain if gain > 0 else None}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{args.precision}, {args.steps} steps a run, each in a fresh process with an empty compiler cache")
    print(f"{'':22}{'eager ms':>10}{'compiled ms':>13}{'compiled/eager':>16}{'compile s':>11}{'break-even':>12}")
    for name, r in results.items():
        even = "never" if r["break_even_steps"] is None else f"{r['break_even_steps']:,.0f} steps"
        print(f"{name:22}{r['eager']['step_seconds'] * 1000:>10.1f}{r['compiled']['step_seconds'] * 1000:>13.1f}"
              f"{r['step_ratio']:>15.2f}x{r['compile_seconds']:>11.1f}{even:>12}")


if __name__ == "__main__":
    main()
