"""Checks that refuse a value no run can use, before any work starts or any file is touched.

Each raises :class:`~gptlib.errors.UserInputError` with a message naming the flag, file or tensor and the fix.
They exist because these values do not fail where they are given: a NaN learning rate trains to a NaN model, a
seed beyond 64 bits overflows deep in PyTorch, an id beyond the vocabulary is an ``IndexError`` inside the
embedding, and a size that cannot fit is an allocator traceback minutes later.
"""

from __future__ import annotations

import math
import os

import torch

from .errors import CheckpointError, UserInputError

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.manual_seed accepts
TOKEN_ID_BYTES = 8  # generation keeps the prompt and every new token id as int64


# ---------------------------------------------------------------- hyper-parameters

def check_options(values: dict) -> None:
    """Refuse option values that are never meaningful: a number that is not finite, a seed beyond 64 bits, a
    dropout outside [0, 1), a negative weight decay, or a generation length that cannot fit in memory.

    ``values`` maps option names (``lr``, ``drop_rate``) to values: ``vars(args)`` or ``asdict(options)``.
    """
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserInputError(f"{_flag(name)} {value}: must be a finite number")
    seed = values.get("seed")
    if isinstance(seed, int) and not SEED_MIN <= seed <= SEED_MAX:
        raise UserInputError(f"--seed {seed}: a seed must fit in 64 bits ({SEED_MIN} to {SEED_MAX}); "
                             "any smaller whole number gives repeatable runs just as well")
    drop_rate = values.get("drop_rate")
    if drop_rate is not None and not 0 <= drop_rate < 1:
        raise UserInputError(f"--drop-rate {drop_rate}: dropout is a probability in [0, 1) (0.1 is usual; "
                             "0 turns it off)")
    weight_decay = values.get("weight_decay")
    if weight_decay is not None and weight_decay < 0:
        raise UserInputError(f"--weight-decay {weight_decay}: must be zero or positive (0.1 is usual)")
    if values.get("max_new_tokens") is not None:
        check_generation_fits(values["max_new_tokens"])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------- sizes

def machine_memory() -> int | None:
    """Bytes of memory this machine has (RAM plus swap), or None when it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return sum(int(fields[key].split()[0]) * 1024 for key in ("MemTotal", "SwapTotal") if key in fields)
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (powers of 1024, as memory is counted)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:,.1f} PB"


def check_generation_fits(max_new_tokens: int, prompt_tokens: int = 0) -> None:
    """Refuse a generation length whose token buffer alone could not fit in this machine's memory."""
    need = (prompt_tokens + max_new_tokens) * TOKEN_ID_BYTES
    memory = machine_memory()
    if memory is not None and need > memory:
        raise UserInputError(
            f"--max-new-tokens {max_new_tokens}: keeping that many token ids takes {format_bytes(need)}, more "
            f"than this machine's {format_bytes(memory)} of memory; ask for fewer tokens (a few hundred is usual: "
            "generation also stops at the end-of-text token)")


def parameter_count(config) -> int:
    """Parameters of a :class:`~gptlib.config.GPTConfig`'s model, from its sizes alone (nothing allocated)."""
    e, v = config.emb_dim, config.vocab_size
    per_block = 12 * e * e + 13 * e + (3 * e if config.qkv_bias else 0)  # qkv, out_proj, 4x MLP, two LayerNorms
    head = 0 if config.tie_weights else v * e
    return v * e + config.context_length * e + config.n_layers * per_block + 2 * e + head


def check_model_fits(config, training: bool = True) -> None:
    """Refuse a model whose weights (and, to train, gradients and AdamW's two moments) cannot fit in memory.

    Activations come on top, so passing this check is necessary, not sufficient.
    """
    params = parameter_count(config)
    need = params * 4 * (4 if training else 1)  # fp32
    memory = machine_memory()
    if memory is not None and need > memory:
        what = "to train (fp32 weights, gradients and two AdamW moments)" if training else "for its fp32 weights"
        raise UserInputError(
            f"model size: emb_dim {config.emb_dim}, n_layers {config.n_layers}, vocab_size {config.vocab_size} "
            f"make {params:,} parameters, which need at least {format_bytes(need)} {what}, more than this "
            f"machine's {format_bytes(memory)} of memory; choose a smaller --emb-dim, --n-layers or --preset")


# ---------------------------------------------------------------- token ids

def check_token_ids(ids, vocab_size: int, source: str) -> None:
    """Refuse token ids the model's embedding has no row for (an ``IndexError`` deep inside the model otherwise)."""
    ids = torch.as_tensor(ids)
    if ids.numel() == 0:
        return
    largest, smallest = int(ids.max()), int(ids.min())
    if smallest < 0:
        raise UserInputError(f"{source}: holds the negative token id {smallest}; token ids start at 0")
    if largest >= vocab_size:
        raise UserInputError(
            f"{source}: holds token id {largest:,}, which needs a vocabulary of at least {largest + 1:,} ids, but "
            f"the model's has {vocab_size:,} (ids 0 to {vocab_size - 1:,}); the text was tokenized for a larger "
            "vocabulary than this model was built with: use the tokenizer the model was trained with, or a "
            "checkpoint made for this tokenizer")


def largest_token_id(dataset) -> int | None:
    """The largest token id in an instruction dataset or a pretraining token stream (None if neither)."""
    items = getattr(dataset, "items", None)  # InstructionDataset: tokenized examples
    if items is not None:
        return max((max(item.ids) for item in items if item.ids), default=None)
    ids = getattr(dataset, "ids", None)  # TokenWindows: one long tensor of ids
    if isinstance(ids, torch.Tensor) and ids.numel():
        return int(ids.max())
    return None


def check_loader_tokens(loaders, vocab_size: int, source) -> None:
    """:func:`check_token_ids` over every example the ``loaders`` (DataLoaders) will give the model."""
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        largest = largest_token_id(getattr(loader, "dataset", None))
        if largest is not None:
            check_token_ids([largest], vocab_size, str(source))


# ---------------------------------------------------------------- checkpoints

def check_finite_tensors(path, model_state: dict, optimizer_state: dict | None = None) -> None:
    """Refuse a checkpoint with a NaN or infinite value in any floating-point tensor, naming the first one.

    Such a file comes from a run that diverged; used as it is, generation prints garbage and evaluation scores NaN.
    """
    tensors = [("tensor", name, t) for name, t in model_state.items()]
    if isinstance(optimizer_state, dict):
        for index, slot in (optimizer_state.get("state") or {}).items():
            if isinstance(slot, dict):
                tensors += [("optimizer tensor", f"state[{index}].{key}", t) for key, t in slot.items()]
    for kind, name, tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise CheckpointError(
                    f"{path}: {kind} '{name}' is not finite ({bad:,} of its {tensor.numel():,} values are NaN or "
                    "infinite): the run that saved it had diverged; use an earlier checkpoint, or train again "
                    "with a lower learning rate")


def unpickling_reason(exc: BaseException) -> str:
    """What torch.load's weights-only unpickler objected to, without its advice to load with weights_only=False:
    that runs whatever code the file holds, so gptlib never suggests it."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and not line.startswith("Check the documentation")]
    return useful[0] if useful else type(exc).__name__
