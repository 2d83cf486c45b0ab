"""Text generation: greedy or sampled, with temperature, top-k, top-p and a repetition penalty.

``stream`` yields token ids one at a time as they are chosen; ``generate`` collects them; ``generate_text``
goes from a string to a string. The KV cache is on by default; ``use_cache=False`` recomputes the whole context
for every token (slower, same result), which notebook 06 uses to show what the cache saves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .guards import check_generation_fits, check_options, check_token_ids
from .instructions import format_prompt
from .model import GPTModel, KVCache


@dataclass
class SamplingSettings:
    """How the next token is chosen. ``temperature=0`` means greedy (always the most likely token)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_options(vars(self))  # NaN or infinity in any of them
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make already-seen tokens less likely (CTRL's rule): divide positive logits, multiply negative ones."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    scores = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits; the rest become -inf."""
    if k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k).values[..., -1, None]
    return logits.masked_fill(logits < threshold, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least ``p`` (nucleus)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """The index of the largest logit in each row (the first one on a tie, as ``torch.argmax``).

    ``max(...).indices`` gives the same indices as ``torch.argmax`` but, measured on torch 2.13's CPU kernels,
    in a third of the time on 50,257 logits (0.9 against 2.4 ms for 64 rows); ``argmax`` had been about a tenth
    of a 64-row decoding step of the seed-small model.
    """
    return logits.max(dim=-1).indices


def next_token(logits: torch.Tensor, settings: SamplingSettings, seen: torch.Tensor,
               generator: torch.Generator | None = None) -> int:
    """Choose one token from a (vocab,) vector of logits."""
    logits = apply_repetition_penalty(logits.float(), seen, settings.repetition_penalty)
    if settings.temperature == 0:
        return int(_argmax(logits))
    logits = logits / settings.temperature
    if settings.top_k is not None:
        logits = filter_top_k(logits, settings.top_k)
    if settings.top_p is not None:
        logits = filter_top_p(logits, settings.top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def _next_logits(model: GPTModel, ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Logits (vocab,) of the token after ``ids`` (1, tokens): the LM head on the last position only.

    No copy of any weight is kept between calls: a derived copy (an earlier version kept the head transposed)
    goes stale when an optimizer updates the weights in place, and measured on torch 2.13's CPU BLAS it saved
    nothing (1.22 against 1.24 ms per token for the tiny model, 3.90 against 3.84 for seed-small).
    """
    return model(ids, kv_cache=cache, last_only=True)[0, -1]


@torch.inference_mode()  # no_grad, and no autograd bookkeeping at all: measured 1-4% faster on a batch
def stream(model: GPTModel, prompt_ids, max_new_tokens: int = 100, settings: SamplingSettings | None = None,
           eos_id: int | None | str = "auto", use_cache: bool = True, seed: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time; stops after ``max_new_tokens`` or at ``eos_id`` (not yielded).

    ``eos_id="auto"`` is the end-of-text id of the model's tokenizer; ``None`` never stops early.
    """
    settings = settings or SamplingSettings()
    if eos_id == "auto":
        eos_id = model.tokenizer.eot_id if model.has_tokenizer else None
    context_length = model.config.context_length
    ids = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=model.device)
    if ids.numel() == 0:
        raise ValueError("the prompt is empty: give at least one token")
    check_token_ids(ids, model.config.vocab_size, "the prompt")
    check_generation_fits(max_new_tokens, len(ids))  # the buffer below holds every token: refuse what cannot fit
    ids = ids[-context_length:]  # a prompt longer than the context keeps its end
    # prompt and new tokens live in one preallocated buffer: no torch.cat (a new tensor) per token
    buffer, n = ids.new_empty(len(ids) + max_new_tokens), len(ids)
    buffer[:n] = ids
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model.config, 1, device=model.device, dtype=model.pos_emb.weight.dtype) if use_cache else None
        logits = _next_logits(model, ids[None], cache)
        for _ in range(max_new_tokens):
            token = next_token(logits, settings, buffer[:n], generator)
            if eos_id is not None and token == eos_id:
                return
            yield token
            buffer[n], n = token, n + 1
            if cache is None or cache.length >= context_length:
                # No cache, or the cache is full: recompute over the last context_length tokens.
                window = buffer[max(0, n - context_length):n]
                if cache is not None:
                    cache.length = 0
                logits = _next_logits(model, window[None], cache)
            else:
                logits = _next_logits(model, buffer[None, n - 1:n], cache)
    finally:
        model.train(was_training)


def _penalize_seen(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """:func:`apply_repetition_penalty` for a batch: ``seen`` is a (rows, vocab) boolean mask of the tokens so far."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def next_tokens(logits: torch.Tensor, settings: SamplingSettings, seen: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose one token per row from (rows, vocab) logits: :func:`next_token` for a batch."""
    logits = _penalize_seen(logits.float(), seen, settings.repetition_penalty)
    if settings.temperature == 0:
        return _argmax(logits)
    logits = logits / settings.temperature
    if settings.top_k is not None:
        logits = filter_top_k(logits, settings.top_k)
    if settings.top_p is not None:
        logits = filter_top_p(logits, settings.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.inference_mode()
def generate_batch(model: GPTModel, prompts, max_new_tokens: int = 100, settings: SamplingSettings | None = None,
                   eos_id: int | None | str = "auto", seed: int | None = None) -> list[list[int]]:
    """New token ids for many prompts at once: one list per prompt, in order, each ending before ``eos_id``.

    The prompts are sorted by length and left-padded, so every row's next token sits in the last column; the
    attention mask keeps padding out of attention and gives each row its own positions. One KV cache serves the
    batch (filled group by group, see :func:`_prefill`). Rows that reached end-of-text leave it once they are a
    quarter of the batch (dropping rows copies the cache, so not one at a time: measured, that copying took a fifth
    of an evaluation's time). One forward pass then computes a token for every row: matrix products where one
    prompt at a time does matrix-vector products. Greedy answers equal :func:`generate` on each prompt alone (up
    to float rounding in near-ties).
    """
    settings = settings or SamplingSettings()
    if eos_id == "auto":
        eos_id = model.tokenizer.eot_id if model.has_tokenizer else None
    context_length, device = model.config.context_length, model.device
    rows = []
    for i, prompt in enumerate(prompts):
        ids = torch.as_tensor(list(prompt), dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        check_token_ids(ids, model.config.vocab_size, f"prompt {i}")
        rows.append(ids.tolist())
    results: list[list[int]] = [[] for _ in rows]
    if not rows or max_new_tokens <= 0:
        return results
    check_generation_fits(max_new_tokens * len(rows), sum(len(r) for r in rows))
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    try:
        # which prompt each row of the batch holds: shortest first, so that neighbouring rows need little padding
        active = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        tokens = [rows[i][-context_length:] for i in active]  # each row's real tokens (the last context's worth)
        seen = torch.zeros(len(rows), model.config.vocab_size, dtype=torch.bool, device=device)
        for r, i in enumerate(active):
            seen[r, rows[i]] = True
        logits, mask, cache = _prefill(model, tokens)
        done = [False] * len(active)  # finished rows still in the batch: their tokens are ignored
        for step in range(max_new_tokens):
            chosen_ids = next_tokens(logits, settings, seen, generator)
            seen[torch.arange(len(active), device=device), chosen_ids] = True
            chosen = chosen_ids.tolist()
            for r, token in enumerate(chosen):
                if done[r]:
                    continue
                if eos_id is not None and token == eos_id:
                    done[r] = True
                    continue
                results[active[r]].append(token)
                tokens[r].append(token)
            if all(done) or step == max_new_tokens - 1:
                break
            if sum(done) * 4 >= len(active):  # a quarter of the rows have finished: they leave the batch
                keep = [r for r in range(len(active)) if not done[r]]
                index = torch.tensor(keep, device=device)
                active, tokens, done = [active[r] for r in keep], [tokens[r] for r in keep], [False] * len(keep)
                seen, mask = seen[index], mask[index]
                cache.keep_rows(index)
                chosen = [chosen[r] for r in keep]
            if cache.length >= context_length:  # the context is full: recompute over each row's last window
                tokens = [row[-context_length:] for row in tokens]
                logits, mask, cache = _prefill(model, tokens)
                continue
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            new = torch.tensor(chosen, dtype=torch.long, device=device)[:, None]
            logits = model(new, attention_mask=mask, kv_cache=cache, last_only=True)[:, -1]
    finally:
        model.train(was_training)
    return results


GROUP_COST = 64
"""What one more group of rows costs in :func:`_prefill`, in padded tokens (each group is a forward pass of its
own). 16 to 256 all do about as well on seed-small and tiny; the measurements are in benchmarks/README.md."""


def _prefill(model: GPTModel, tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
    """Run the prompts ``tokens`` through a fresh KV cache, left-padded: (last logits, mask, cache).

    The first tokens that every row shares (a prompt template's header) are computed once, for one row, and their
    keys and values copied to every row. The rows then run in groups of neighbours (:func:`_row_groups`), each
    padded only to its own longest row, so a row of the cache is ``[group padding][shared][padding][own]`` and
    every row ends in the same column. The attention mask keeps the padding out and gives every token its true
    position.
    """
    device, n = model.device, len(tokens)
    # (each row keeps at least one token of its own, whose logits are the ones returned)
    shared = min(_common_prefix_length(tokens), min(len(row) for row in tokens) - 1) if n > 1 else 0
    cache = KVCache(model.config, n, device=device, dtype=model.pos_emb.weight.dtype)
    if shared > 0:
        prefix = KVCache(model.config, 1, max_len=shared, device=device, dtype=cache.keys.dtype)
        model.hidden_states(torch.tensor([tokens[0][:shared]], device=device), kv_cache=prefix)
    own = [row[shared:] for row in tokens]
    longest = max(len(row) for row in own)
    mask = torch.zeros(n, shared + longest, dtype=torch.long, device=device)
    last = []  # each row's last hidden state
    for first, end in _row_groups([len(row) for row in own]):
        width = max(len(row) for row in own[first:end])
        first_key = longest - width  # the columns before it hold only padding for these rows
        group = cache.rows(first, end, first_key)
        # masked out, but still read by attention: left as garbage, a NaN there would spread (NaN * 0 is NaN)
        cache.keys[:, first:end, :, :first_key] = 0
        cache.values[:, first:end, :, :first_key] = 0
        if shared > 0:
            group.keys[:, :, :, :shared] = prefix.keys  # (layers, 1, heads, shared, head_dim) to every row
            group.values[:, :, :, :shared] = prefix.values
            group.length = shared
        ids = torch.zeros(end - first, width, dtype=torch.long, device=device)
        for i, row in enumerate(own[first:end]):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[first + i, first_key:first_key + shared] = 1
            mask[first + i, shared + longest - len(row):] = 1
        last.append(model.hidden_states(ids, attention_mask=mask[first:end, first_key:], kv_cache=group)[:, -1])
    cache.length = shared + longest
    return model.out_head(torch.cat(last)), mask, cache  # the LM head once: its weights are read once


def _row_groups(lengths: list[int], group_cost: int = GROUP_COST) -> list[tuple[int, int]]:
    """Split rows into runs of neighbours ``[(first, end), ...]`` that minimise the padded tokens (each run padded
    to its longest row) plus ``group_cost`` per run. Dynamic programming over where the last run starts."""
    best, start = [0] + [None] * len(lengths), [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        width = 0
        for first in range(end - 1, -1, -1):
            width = max(width, lengths[first])
            cost = best[first] + (end - first) * width + group_cost
            if best[end] is None or cost < best[end]:
                best[end], start[end] = cost, first
    runs, end = [], len(lengths)
    while end:
        runs.append((start[end], end))
        end = start[end]
    return runs[::-1]


def _common_prefix_length(rows: list[list[int]]) -> int:
    first = rows[0]
    length = min(len(row) for row in rows)
    for row in rows[1:]:
        length = next((i for i in range(length) if row[i] != first[i]), length)
    return length


def generate(model: GPTModel, prompt_ids, max_new_tokens: int = 100, settings: SamplingSettings | None = None,
             eos_id: int | None | str = "auto", use_cache: bool = True, seed: int | None = None) -> list[int]:
    """The new token ids (without the prompt), as a list."""
    return list(stream(model, prompt_ids, max_new_tokens, settings, eos_id, use_cache, seed))


def generate_text(model: GPTModel, prompt: str, max_new_tokens: int = 100, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                  seed: int | None = None, use_cache: bool = True) -> str:
    """Continue ``prompt``; return only the new text. The model's own tokenizer turns text into ids and back."""
    settings = SamplingSettings(temperature, top_k, top_p, repetition_penalty)
    tokenizer = model.tokenizer
    return tokenizer.decode(generate(model, tokenizer.encode(prompt), max_new_tokens, settings,
                                     use_cache=use_cache, seed=seed))


def answer_instruction(model: GPTModel, instruction: str, input: str = "", max_new_tokens: int = 100,
                       **sampling) -> str:
    """Wrap an instruction in the prompt template and return the model's response, stripped."""
    return generate_text(model, format_prompt(instruction, input), max_new_tokens, **sampling).strip()


def answer_instructions(model: GPTModel, pairs, max_new_tokens: int = 100, batch_size: int = 64,
                        temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                        repetition_penalty: float = 1.0, seed: int | None = None) -> list[str]:
    """:func:`answer_instruction` for many ``(instruction, input)`` pairs, ``batch_size`` at a time: the answers,
    stripped, in order. Prompts of similar length share a batch (less padding); greedy answers are the same."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    settings = SamplingSettings(temperature, top_k, top_p, repetition_penalty)
    tokenizer = model.tokenizer
    prompts = [tokenizer.encode(format_prompt(instruction, input)) for instruction, input in pairs]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch_seed = None if seed is None else seed + start
        outputs = generate_batch(model, [prompts[i] for i in chunk], max_new_tokens, settings, seed=batch_seed)
        for i, ids in zip(chunk, outputs):
            answers[i] = tokenizer.decode(ids).strip()
    return answers
