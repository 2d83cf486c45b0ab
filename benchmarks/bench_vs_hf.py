"""gptlib against Hugging Face ``GPT2LMHeadModel``: same config, same weights, same process, as ratios.

    python benchmarks/bench_vs_hf.py --config seed-small --repeats 5
    python benchmarks/bench_vs_hf.py --quick          # a tiny smoke run (seconds)

It first checks that both models compute the same function (logits close, identical greedy tokens), then times,
alternating gptlib and HF (A/B, B/A, ...) over ``--repeats`` and reporting medians:
  (a) a fine-tuning step (forward, backward, clip, AdamW) on real sarcasm batches: supervised tokens/s;
  (b) a pretraining step on full windows: tokens/s, and FLOP/s as a share of a matmul peak measured here;
  (c) greedy generation, batch 1: tokens/s against HF ``generate`` and against the loop with no cache;
  (d) peak memory of one step of (a) and (b), each in a fresh subprocess (see ``measure_memory``);
  (e) batched greedy generation, 16 and 64 prompts of mixed lengths (left-padded): new tokens/s against HF
      ``generate`` on the same padded batch, and against gptlib answering the 64 prompts one at a time.
(a), (b) and (d) are run for each side's default precision (gptlib's precision="auto" is bf16 mixed precision on a
CPU with AVX-512 BF16 or AMX; HF trains in fp32 unless told otherwise), then for both in fp32 and both under bf16
autocast, so that every ratio also has a same-precision twin. Generation is fp32 on both sides.
Needs transformers: ``pip install 'gptlib[hf]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from gptlib import preset
from gptlib.data import instruction_loader, padding_share, window_loader
from gptlib.generate import generate, generate_batch
from gptlib.hf import hf_config, to_hf
from gptlib.instructions import load_jsonl, split_examples
from gptlib.model import IGNORE_INDEX, GPTModel
from gptlib.tokenizer import encode
from gptlib.train import TrainConfig, _autocast, batch_loss, make_optimizer, resolve_precision

ROOT = Path(__file__).resolve().parents[1]
SARCASM = ROOT / "dataset" / "sarcasm" / "sarcasm_instruction_pairs.jsonl"
PRETRAIN = ROOT / "dataset" / "pretraining" / "shakespeare_train.txt"
INSTALL_HINT = "transformers is not installed: pip install 'gptlib[hf]'  (or: pip install transformers)"


# ---------------------------------------------------------------- the two models, same weights

def build_models(config_name: str):
    """gptlib's model and an HF GPT2LMHeadModel holding the same weights (gptlib.hf.to_hf maps the names)."""
    torch.manual_seed(0)
    ours = GPTModel(preset(config_name))
    return ours, to_hf(ours)


def hf_greedy(hf, prompt, n):
    # no end-of-text stop, like gptlib's eos_id=None (min_new_tokens would instead forbid that token)
    hf.generation_config.eos_token_id = None
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                      use_cache=True, pad_token_id=50256, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def hf_greedy_batch(hf, prompts, n):
    """HF ``generate`` on a left-padded batch (its documented way for decoder-only models)."""
    hf.generation_config.eos_token_id = None
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[50256] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=True,
                      pad_token_id=50256)
    return out[:, width:].tolist()


def mixed_prompts(n: int, longest: int) -> list[list[int]]:
    """``n`` prompts of 8 to ``longest`` tokens from the plays, lengths spread evenly (fixed seed)."""
    ids = encode(PRETRAIN.read_text(encoding="utf-8")[:20_000])
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, max(9, min(longest, 96)), (n,), generator=g).tolist()
    starts = torch.randint(0, len(ids) - 100, (n,), generator=g).tolist()
    return [ids[s:s + k] for s, k in zip(starts, lengths)]


def check_agreement(ours, hf, prompt) -> dict:
    ours.eval(), hf.eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    a = generate(ours, prompt, 20, eos_id=None)
    b = hf_greedy(hf, prompt, 20)
    if diff > 1e-3 or a != b:
        raise SystemExit(f"the two models disagree: max |logit diff| {diff:.2e}, greedy tokens equal: {a == b}")
    return {"max_logit_diff": diff, "greedy_equal": a == b}


# ---------------------------------------------------------------- data

def finetune_batches(cfg, batch_size: int, n: int) -> list[dict]:
    split = split_examples(load_jsonl(SARCASM))
    loader = instruction_loader(split.train, batch_size=batch_size, max_length=cfg.context_length)
    return [b for _, b in zip(range(n), loader)]


def hf_finetune_batch(batch: dict, context_length: int) -> dict:
    """The usual HF form of the same batch: the whole text as input_ids, labels = input_ids with -100 masks.

    gptlib's batches are already shifted (labels[t] = ids[t + 1]); HF shifts inside. So HF gets the full
    sequence (one token longer) and exactly the same supervised targets.
    """
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    if ids.shape[1] + 1 > context_length:
        raise SystemExit("a fine-tuning batch is too long for the HF form; lower the batch width")
    lengths = mask.sum(1)
    full = torch.cat([ids, ids[:, :1]], dim=1)
    full_mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
    rows = torch.arange(len(ids))
    full[rows, lengths] = labels[rows, lengths - 1].clamp(min=0)  # the last token of each row
    full_mask[rows, lengths] = 1
    hf_labels = torch.full_like(full, IGNORE_INDEX)
    hf_labels[:, 1:] = labels
    return {"input_ids": full, "attention_mask": full_mask, "labels": hf_labels}


def pretrain_batch(cfg, batch_size: int) -> dict:
    ids = encode(PRETRAIN.read_text(encoding="utf-8")[:200_000])
    return next(iter(window_loader(ids, cfg.context_length, batch_size, shuffle=False)))


# ---------------------------------------------------------------- one training step each

def gptlib_trainer(model: GPTModel, precision: str = "auto"):
    cfg = TrainConfig(lr=1e-5, precision=precision, progress=False)
    optimizer = make_optimizer(model, cfg)

    def step(batch: dict) -> None:
        with _autocast(model.device, cfg.precision):
            loss, _ = batch_loss(model, batch, model.device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def hf_trainer(hf, precision: str = "fp32"):
    """HF's training step as its Trainer runs it: fused AdamW (its default with torch >= 2.8), and with
    ``bf16=True`` the forward pass under bf16 autocast."""
    optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(batch: dict) -> None:
        with autocast:
            loss = hf(**batch).loss  # HF's standard loss: full logits, shifted, cross-entropy
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


WARMUPS = 2


def ab(fa, fb, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of fa and fb, alternating which goes first, after two untimed warm-ups each.

    (The first calls with a new shape are slow on CPU: oneDNN builds kernels and fresh memory is paged in.)"""
    for _ in range(WARMUPS):
        fa(), fb()
    ta, tb = [], []
    for r in range(repeats):
        if r % 2 == 0:
            ta.append(timed(fa)), tb.append(timed(fb))
        else:
            tb.append(timed(fb)), ta.append(timed(fa))
    return ta, tb


def matmul_peak(n: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) matmul in ``dtype``: the ceiling a training step is measured against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    return max(2 * n ** 3 / timed(lambda: a @ b) for _ in range(repeats))


def step_flops(cfg, batch: int, tokens: int) -> float:
    """Matmul FLOPs of one training step: 6 per parameter per token (blocks and LM head), plus attention
    (QK^T and AV, causal half counted: 6 * layers * tokens * emb_dim per token). Embedding lookups are free."""
    d, L = cfg.emb_dim, cfg.n_layers
    block_params = L * 12 * d * d
    head_params = cfg.vocab_size * d
    return batch * tokens * (6 * (block_params + head_params) + 6 * L * tokens * d)


# ---------------------------------------------------------------- memory, in a fresh process per figure

def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(which: str, kind: str, config_name: str, batch_size: int, precision: str) -> None:
    """Runs in a subprocess: one warm-up step, then the peak RSS of one more step above the resting RSS.

    The warm-up allocates the optimizer state; writing 5 to /proc/self/clear_refs resets the peak (VmHWM),
    so the figure is the step's own transient memory (activations, logits, gradients)."""
    torch.manual_seed(0)
    cfg = preset(config_name)
    if kind == "finetune":
        batch = max(finetune_batches(cfg, batch_size, 8), key=lambda b: b["input_ids"].numel())
    else:
        batch = pretrain_batch(cfg, batch_size)
    if which == "gptlib":
        model = GPTModel(cfg).train()
        step = gptlib_trainer(model, precision)
    else:
        from transformers import GPT2LMHeadModel
        model = GPT2LMHeadModel(hf_config(cfg)).train()
        step = hf_trainer(model, precision)
        if kind == "finetune":
            batch = hf_finetune_batch(batch, cfg.context_length)
        else:
            batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}
    step(batch)
    Path("/proc/self/clear_refs").write_text("5")
    rest = _rss_kb("VmRSS")
    step(batch)
    print(json.dumps({"peak_mb": (_rss_kb("VmHWM") - rest) / 1024}))


def measure_memory(which: str, kind: str, config_name: str, batch_size: int, precision: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-child", which, kind, precision, "--config", config_name,
                          "--batch-size", str(batch_size)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


# ---------------------------------------------------------------- report

def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    bf16 = ", AVX-512 BF16" if "avx512_bf16" in flags else ""
    import transformers
    return (f"{cpu}{bf16}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")


def med(xs):
    return statistics.median(xs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="seed-small", choices=["seed-small", "tiny"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny config, small sizes: a smoke test")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=200)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--generation-only", action="store_true",
                        help="only the generation measures (c) and (e): no training steps, no memory")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    if args.memory_child:
        which, kind, precision = args.memory_child
        memory_child(which, kind, args.config, args.batch_size, precision)
        return 0
    global WARMUPS
    if args.quick:
        args.config, args.repeats, args.batch_size, args.gen_tokens = "tiny", 1, 2, 16
        WARMUPS = 1
    cfg = preset(args.config)
    n_ft = 1 if args.quick else 4  # fine-tuning batches per timed run
    print(f"machine: {machine()}")
    print(f"config: {args.config} ({cfg.emb_dim} wide, {cfg.n_layers} layers, {cfg.n_heads} heads, "
          f"ctx {cfg.context_length}, vocab {cfg.vocab_size}), batch {args.batch_size}, repeats {args.repeats}")

    ours, hf = build_models(args.config)
    prompt = encode(PRETRAIN.read_text(encoding="utf-8")[:2000])[:32]
    agree = check_agreement(ours, hf, prompt)
    print(f"agreement: max |logit diff| {agree['max_logit_diff']:.1e}, greedy tokens identical")

    split = split_examples(load_jsonl(SARCASM))
    pad_grouped = padding_share(instruction_loader(split.train, args.batch_size, cfg.context_length))
    pad_plain = padding_share(instruction_loader(split.train, args.batch_size, cfg.context_length,
                                                 group_by_length=False))
    print(f"sarcasm padding share, batch {args.batch_size}: {pad_grouped:.1%} grouped by length, "
          f"{pad_plain:.1%} plain shuffled")

    rows = []  # (what, gptlib, reference)
    auto = resolve_precision(torch.device("cpu"), "auto")
    print(f"gptlib's default precision here (precision='auto'): {auto}")
    # (gptlib precision, HF precision, label): the defaults of each, then the same precision on both sides
    races = [("auto", "fp32", f"defaults: gptlib {auto}, HF fp32"), ("fp32", "fp32", "both fp32"),
             ("bf16", "bf16", "both bf16 autocast")]
    if auto == "fp32":
        races = races[1:]
    peaks = {"fp32": matmul_peak(), "bf16": matmul_peak(dtype=torch.bfloat16)}
    ours.train(), hf.train()

    if args.generation_only:
        races, args.no_memory = [], True
    # (a) fine-tuning
    batches = finetune_batches(cfg, args.batch_size, n_ft)
    hf_batches = [hf_finetune_batch(b, cfg.context_length) for b in batches]
    supervised = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    assert supervised == sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in hf_batches)
    for ours_precision, hf_precision, label in races:
        step_a, step_b = gptlib_trainer(ours, ours_precision), hf_trainer(hf, hf_precision)
        ta, tb = ab(lambda: [step_a(b) for b in batches], lambda: [step_b(b) for b in hf_batches], args.repeats)
        rows.append((f"fine-tuning step, supervised tokens/s ({label})", supervised / med(ta), supervised / med(tb)))
    print("fine-tuning done", file=sys.stderr, flush=True)

    # (b) pretraining
    batch = pretrain_batch(cfg, args.batch_size)
    hf_batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}
    n_tok = batch["input_ids"].numel()
    flops = step_flops(cfg, *batch["input_ids"].shape)
    for ours_precision, hf_precision, label in races:
        step_a, step_b = gptlib_trainer(ours, ours_precision), hf_trainer(hf, hf_precision)
        ta, tb = ab(lambda: step_a(batch), lambda: step_b(hf_batch), args.repeats)
        rows.append((f"pretraining step, tokens/s ({label})", n_tok / med(ta), n_tok / med(tb)))
        if ours_precision == hf_precision:
            rows.append((f"  share of the {hf_precision} matmul peak", flops / med(ta) / peaks[hf_precision],
                         flops / med(tb) / peaks[hf_precision]))
    print("pretraining done", file=sys.stderr, flush=True)

    # (c) greedy generation, batch 1; the training steps above moved the two models apart: same weights again
    ours.eval(), hf.eval()
    hf.load_state_dict(to_hf(ours).state_dict())
    n_gen = min(args.gen_tokens, cfg.context_length - len(prompt))
    outs = {}
    ta, tb = ab(lambda: outs.__setitem__("a", generate(ours, prompt, n_gen, eos_id=None)),
                lambda: outs.__setitem__("b", hf_greedy(hf, prompt, n_gen)), args.repeats)
    tn = [timed(lambda: outs.__setitem__("n", generate(ours, prompt, n_gen, eos_id=None, use_cache=False)))
          for _ in range(max(1, min(3, args.repeats)))]
    # A randomly initialised model has near-ties between logits, so float rounding (different but equally
    # exact matmul kernels) can flip an argmax late in a long run: report how far the three agree.
    same = [next((i for i, (x, y) in enumerate(zip(outs["a"], o)) if x != y), n_gen) for o in (outs["b"], outs["n"])]
    print(f"greedy generation: identical first {same[0]}/{n_gen} tokens with HF, {same[1]}/{n_gen} with no cache")
    rows.append((f"greedy generation {n_gen} tokens, tokens/s", n_gen / med(ta), n_gen / med(tb)))
    rows.append(("  gptlib cached vs gptlib no-cache loop", n_gen / med(ta), n_gen / med(tn)))

    # (e) batched greedy generation: prompts of mixed lengths, left-padded on both sides
    n_batch_gen = 8 if args.quick else 32
    for rows_in_batch in ((4,) if args.quick else (16, 64)):
        prompts = mixed_prompts(rows_in_batch, cfg.context_length - n_batch_gen)
        ta, tb = ab(lambda: outs.__setitem__("a", generate_batch(ours, prompts, n_batch_gen, eos_id=None)),
                    lambda: outs.__setitem__("b", hf_greedy_batch(hf, prompts, n_batch_gen)), args.repeats)
        agree_rows = sum(x == y for x, y in zip(outs["a"], outs["b"]))
        print(f"batched generation, {rows_in_batch} prompts: {agree_rows}/{rows_in_batch} rows identical with HF")
        # where the time goes: the prompts (one new token each) against every further decoding step
        pa, pb = ab(lambda: generate_batch(ours, prompts, 1, eos_id=None), lambda: hf_greedy_batch(hf, prompts, 1),
                    args.repeats)
        step_a, step_b = ((med(t) - med(p)) / (n_batch_gen - 1) * 1e3 for t, p in ((ta, pa), (tb, pb)))
        print(f"  {rows_in_batch} prompts: the prompts take {med(pa):.3f} s (HF {med(pb):.3f} s, "
              f"{med(pb) / med(pa):.2f}x); each further token {step_a:.1f} ms for the batch (HF {step_b:.1f} ms, "
              f"{step_b / step_a:.2f}x)")
        n_new = rows_in_batch * n_batch_gen
        rows.append((f"batched greedy generation, {rows_in_batch} prompts x {n_batch_gen} tokens, tokens/s",
                     n_new / med(ta), n_new / med(tb)))
        if rows_in_batch == (4 if args.quick else 64):
            tl = [timed(lambda: [generate(ours, p, n_batch_gen, eos_id=None) for p in prompts])
                  for _ in range(max(1, min(3, args.repeats)))]
            rows.append((f"  gptlib batch of {rows_in_batch} vs gptlib one prompt at a time", n_new / med(ta),
                         n_new / med(tl)))

    # a busy neighbour can depress one peak measurement: keep the better of the two, and rescale the shares
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        best = max(peaks[name], matmul_peak(dtype=dtype))
        rows = [(w, a * peaks[name] / best, b * peaks[name] / best) if f"{name} matmul peak" in w else (w, a, b)
                for w, a, b in rows]
        peaks[name] = best

    # (d) memory
    if not args.no_memory:
        for kind in ("finetune", "pretrain"):
            for ours_precision, hf_precision, label in races:
                a = measure_memory("gptlib", kind, args.config, args.batch_size, ours_precision)
                b = measure_memory("hf", kind, args.config, args.batch_size, hf_precision)
                rows.append((f"{kind} step peak memory above rest, MB ({label})", a, b))

    print(f"matmul peak (2048^3, best of 5 at the start and 5 at the end): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    print()
    width = max(len(what) for what, _, _ in rows) + 2
    print(f"| {'measure (median of ' + str(args.repeats) + ')':<{width}} | {'gptlib':>8} | {'reference':>9} | {'ratio':>6} |")
    print(f"|{'-' * (width + 2)}|{'-' * 10}|{'-' * 11}|{'-' * 8}|")
    for what, a, b in rows:
        fmt = (lambda x: f"{x:.0%}") if "share" in what else (lambda x: f"{x:,.0f}" if x >= 100 else f"{x:.1f}")
        print(f"| {what:<{width}} | {fmt(a):>8} | {fmt(b):>9} | {a / b:>5.2f}x |")
    print("\nreference = HF GPT2LMHeadModel (same weights), except the no-cache row (gptlib use_cache=False).")
    print("Memory: peak RSS (VmHWM) of one step above the resting RSS after a warm-up step, fresh process each.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
