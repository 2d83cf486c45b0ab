"""Batch-1 greedy decoding: what each candidate speed measure is worth, each measured alone, same run.

    python benchmarks/bench_decode.py                    # seed-small, 200 new tokens after 32
    python benchmarks/bench_decode.py --config tiny --tokens 90

Rows (tokens per second, best of ``--repeats``; every variant must give the fp32 eager tokens or says how many
agree):
- fp32, eager: what ``gptlib.generate`` does;
- fp32, one thread: whether the small per-layer matrix-vector products lose to threading overhead;
- bf16 weights: a bf16 copy of the model, which halves the bytes each token reads (the batch-1 bound);
- ``torch.compile(model.forward, dynamic=True)``: the model as it is, compiled (the KV cache's in-place writes
  stay in Python);
- a static-cache step compiled whole: one decoding step written with fixed shapes (a cache of the full context,
  the position as a tensor, attention masked beyond it), ``torch.compile(fullgraph=True)``; its rate counts the
  prompt's tokens too, which it feeds one at a time.
Then the LM head's matrix-vector product alone in fp32 and bf16, as achieved GB/s of weights read: batch-1
decoding reads every weight once per token, so this is the ceiling that the weights' dtype sets.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from gptlib import GPTModel, preset
from gptlib.generate import generate


def tokens_per_second(model: GPTModel, prompt: list[int], n: int, repeats: int) -> tuple[float, list[int]]:
    generate(model, prompt, 10, eos_id=None)  # warm-up (and, compiled, the compilation)
    best, out = 0.0, []
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(model, prompt, n, eos_id=None)
        best = max(best, n / (time.perf_counter() - start))
    return best, out


def static_step(model: GPTModel, token, position, keys, values):
    """One decoding step with fixed shapes: ``keys``/``values`` (layers, 1, heads, context, head_dim) are written at
    ``position`` (a 1-element tensor) and attention is masked beyond it, so one compiled graph serves every step."""
    config = model.config
    width, heads = config.emb_dim, config.n_heads
    x = model.tok_emb(token) + model.pos_emb(position)[None]  # (1, 1, emb_dim)
    visible = (torch.arange(config.context_length) <= position)[None, None, None, :]
    for i, block in enumerate(model.blocks):
        q, k, v = block.att.qkv(block.norm1(x)).split(width, dim=2)
        q, k, v = (z.view(1, 1, heads, width // heads).transpose(1, 2) for z in (q, k, v))
        keys[i].index_copy_(2, position, k)
        values[i].index_copy_(2, position, v)
        y = torch.nn.functional.scaled_dot_product_attention(q, keys[i], values[i], attn_mask=visible)
        x = x + block.att.out_proj(y.transpose(1, 2).reshape(1, 1, width))
        x = x + block.ff(block.norm2(x))
    return model.out_head(model.final_norm(x))[0, -1]


def static_tokens_per_second(model: GPTModel, prompt: list[int], n: int, repeats: int) -> tuple[float, list[int]]:
    config = model.config
    step = torch.compile(static_step, fullgraph=True)
    shape = (config.n_layers, 1, config.n_heads, config.context_length, config.emb_dim // config.n_heads)

    @torch.no_grad()
    def run(n_new: int) -> list[int]:
        keys, values = torch.zeros(shape), torch.zeros(shape)
        for position, token in enumerate(prompt):
            logits = step(model, torch.tensor([[token]]), torch.tensor([position]), keys, values)
        out = []
        for i in range(n_new):
            out.append(int(torch.argmax(logits)))
            logits = step(model, torch.tensor([[out[-1]]]), torch.tensor([len(prompt) + i]), keys, values)
        return out

    run(10)  # compiles
    best, out = 0.0, []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run(n)
        best = max(best, (n + len(prompt)) / (time.perf_counter() - start))
    return best, out


def head_bandwidth(config, dtype: torch.dtype, calls: int = 50) -> float:
    """GB/s of weights read by the LM head's (1, emb) x (emb, vocab) product."""
    weight = torch.randn(config.vocab_size, config.emb_dim).to(dtype)
    x = torch.randn(1, config.emb_dim).to(dtype)
    for _ in range(3):
        torch.nn.functional.linear(x, weight)
    start = time.perf_counter()
    for _ in range(calls):
        torch.nn.functional.linear(x, weight)
    seconds = (time.perf_counter() - start) / calls
    return weight.numel() * weight.element_size() / seconds / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="seed-small", choices=["seed-small", "tiny"])
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per run (default 200)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (it compiles for ~30 s)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = GPTModel(preset(args.config)).eval()
    prompt = list(range(100, 132))
    threads = torch.get_num_threads()
    rows = []
    base, reference = tokens_per_second(model, prompt, args.tokens, args.repeats)
    rows.append((f"fp32, eager, {threads} threads (gptlib.generate)", base, args.tokens))
    torch.set_num_threads(1)
    rate, out = tokens_per_second(model, prompt, args.tokens, args.repeats)
    torch.set_num_threads(threads)
    rows.append(("fp32, eager, 1 thread", rate, sum(a == b for a, b in zip(out, reference))))
    rate, out = tokens_per_second(copy.deepcopy(model).to(torch.bfloat16), prompt, args.tokens, args.repeats)
    rows.append(("bf16 weights, eager", rate, sum(a == b for a, b in zip(out, reference))))
    if not args.no_compile:
        compiled = copy.deepcopy(model)
        compiled.forward = torch.compile(compiled.forward, dynamic=True)
        rate, out = tokens_per_second(compiled, prompt, args.tokens, args.repeats)
        rows.append(("fp32, torch.compile(model.forward, dynamic=True)", rate, sum(a == b for a, b in zip(out, reference))))
        rate, out = static_tokens_per_second(model, prompt, args.tokens, args.repeats)
        rows.append(("fp32, static-cache step, torch.compile(fullgraph=True)", rate,
                     sum(a == b for a, b in zip(out, reference))))
    print(f"{args.config}: greedy, batch 1, {args.tokens} new tokens after {len(prompt)}; torch {torch.__version__}")
    print("| variant | tokens/s | vs fp32 eager | tokens equal to fp32 eager |")
    print("|---|---:|---:|---:|")
    for name, rate, equal in rows:
        print(f"| {name} | {rate:.0f} | {rate / base:.2f}x | {equal}/{args.tokens} |")
    for dtype in (torch.float32, torch.bfloat16):
        print(f"LM head matrix-vector product, {str(dtype).split('.')[-1]}: {head_bandwidth(model.config, dtype):.1f} "
              "GB/s of weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
