"""Saving and loading ``.pth`` checkpoints, including ones gptlib did not write.

Three forms are read (see DESIGN.md):

1. gptlib's own: ``{"format": "gptlib", "config", "tokenizer", "model_state_dict", "optimizer_state_dict"?,
   "train_state"?}``; ``tokenizer`` is the tokenizer's ``to_dict()`` (plain strings), so one file is a whole model;
2. the "LLMs from scratch" ``GPTModel`` form ``{"model_state_dict", "optimizer_state_dict"}`` with no config:
   the sizes are read from the tensor shapes, except the number of heads, which the caller gives;
3. a bare ``state_dict`` in either naming.

Files without a tokenizer (forms 2 and 3, and gptlib files written before tokenizers were stored) mean GPT-2.

Everything is loaded with ``torch.load(..., weights_only=True)``: a checkpoint can never run code.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import GPTConfig
from .errors import CheckpointError
from .files import atomic_write
from .guards import check_finite_tensors, unpickling_reason
from .model import GPTModel
from .tokenizer import GPT2, Tokenizer, tokenizer_from_dict

FORMAT = "gptlib"

# "LLMs from scratch" parameter names (per block) -> gptlib's, in the order that model registers them.
# W_query, W_key and W_value become three slices of gptlib's single qkv projection.
_SCRATCH_BLOCK = [
    ("att.W_query.weight", "att.qkv.weight", 0), ("att.W_query.bias", "att.qkv.bias", 0),
    ("att.W_key.weight", "att.qkv.weight", 1), ("att.W_key.bias", "att.qkv.bias", 1),
    ("att.W_value.weight", "att.qkv.weight", 2), ("att.W_value.bias", "att.qkv.bias", 2),
    ("att.out_proj.weight", "att.out_proj.weight", None), ("att.out_proj.bias", "att.out_proj.bias", None),
    ("ff.layers.0.weight", "ff.fc.weight", None), ("ff.layers.0.bias", "ff.fc.bias", None),
    ("ff.layers.2.weight", "ff.proj.weight", None), ("ff.layers.2.bias", "ff.proj.bias", None),
    ("norm1.scale", "norm1.weight", None), ("norm1.shift", "norm1.bias", None),
    ("norm2.scale", "norm2.weight", None), ("norm2.shift", "norm2.bias", None),
]
_SCRATCH_TOP = {"tok_emb.weight": "tok_emb.weight", "pos_emb.weight": "pos_emb.weight",
                "final_norm.scale": "final_norm.weight", "final_norm.shift": "final_norm.bias",
                "out_head.weight": "out_head.weight"}
_PREFIXES = ("_orig_mod.", "module.")  # added by torch.compile and by DistributedDataParallel


@dataclass
class Checkpoint:
    """What a checkpoint file held, translated to gptlib's names."""

    config: GPTConfig
    model_state: dict
    optimizer_state: dict | None = None
    train_state: dict = field(default_factory=dict)
    source_format: str = FORMAT  # "gptlib", "llms-from-scratch" or "state_dict"
    tokenizer: Tokenizer = GPT2  # what the token ids mean
    labels: list[str] | None = None  # a classifier's label names (see gptlib.classify); None for a language model


# ---------------------------------------------------------------- saving

def save_checkpoint(path, model: GPTModel, optimizer: torch.optim.Optimizer | None = None,
                    train_state: dict | None = None) -> None:
    """Write a gptlib checkpoint atomically (a crash mid-write leaves any earlier file intact)."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    if getattr(model, "lora", None) is not None:  # LoRA: the adapters alone, with the base they belong to
        from .lora import adapter_payload
        payload = adapter_payload(model)
    else:
        payload = {
            "format": FORMAT,
            "config": model.config.to_dict(),
            "model_state_dict": model.state_dict(),
        }
    if model.has_tokenizer and "model_state_dict" in payload:
        payload["tokenizer"] = model.tokenizer.to_dict()
    if getattr(model, "labels", None):  # a GPTClassifier: its outputs mean these labels, in this order
        payload["labels"] = list(model.labels)
    if optimizer is not None:
        payload["optimizer_state_dict"] = optimizer.state_dict()
    if train_state:
        payload["train_state"] = train_state
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


# ---------------------------------------------------------------- reading

def read_checkpoint(path, n_heads: int | None = None, drop_rate: float | None = None,
                    allow_classifier: bool = False, raw=None) -> Checkpoint:
    """Read any supported checkpoint form into a :class:`Checkpoint` with gptlib's names.

    ``n_heads`` is needed only when the file carries no config (the head count is not visible in the
    tensor shapes); ``drop_rate`` overrides the stored or default dropout (0.1, the seed guide's).
    A classifier's file (one that stores label names) is refused unless ``allow_classifier``: it does not
    generate text.
    """
    from .lora import is_adapter_file
    raw = _torch_load(path) if raw is None else raw
    if is_adapter_file(raw):
        base = raw["base"].get("path") if isinstance(raw.get("base"), dict) else None
        raise CheckpointError(f"{path}: is a LoRA adapter (for the base {base}), not a full checkpoint; "
                              f"fold it into one first: gptlib merge --adapter {path} --out FULL.pth")
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{path}: holds a {type(raw).__name__}, not a dict of tensors; "
                              "expected a model state_dict or a dict with 'model_state_dict'")
    labels = raw.get("labels") if "model_state_dict" in raw else None
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise CheckpointError(f"{path}: its stored 'labels' are not a list of label names")
        if not allow_classifier:
            raise CheckpointError(f"{path}: is a classifier (labels {labels}), not a language model; use it with "
                                  "`gptlib classify predict` or gptlib.classify.load_classifier")
    if "model_state_dict" in raw:
        state = raw["model_state_dict"]
        optimizer_state = raw.get("optimizer_state_dict")
        stored_config = raw.get("config")
        train_state = raw.get("train_state") or {}
        stored_tokenizer = raw.get("tokenizer")
    else:
        state, optimizer_state, stored_config, train_state, stored_tokenizer = raw, None, None, {}, None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'model_state_dict' is not a dict of tensors")
    state = {_strip_prefixes(k): v for k, v in state.items()}
    check_finite_tensors(path, state, optimizer_state)

    wrapped = "model_state_dict" in raw
    scratch_state = None
    if "trf_blocks.0.att.W_query.weight" in state:
        scratch_state, state = state, _scratch_state_to_gptlib(state)
        source_format = "llms-from-scratch" if wrapped else "state_dict"
    elif "blocks.0.att.qkv.weight" in state:
        source_format = FORMAT if stored_config is not None else "state_dict"
    else:
        sample = ", ".join(list(state)[:4])
        raise CheckpointError(
            f"{path}: not a GPT checkpoint gptlib can read: expected tensors such as 'tok_emb.weight' and "
            f"'trf_blocks.0.att.W_query.weight' (LLMs from scratch) or 'blocks.0.att.qkv.weight' (gptlib), "
            f"found {sample}. Convert other architectures first."
        )

    if stored_config is not None:
        try:
            config = GPTConfig.from_dict(dict(stored_config))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: its stored config is invalid: {exc}") from None
        if n_heads is not None and n_heads != config.n_heads:
            raise CheckpointError(f"{path}: n_heads {n_heads} (--n-heads) disagrees with the checkpoint's "
                                  f"config n_heads={config.n_heads}; drop the flag")
        if drop_rate is not None:
            config.drop_rate = drop_rate
    else:
        config = infer_config(path, state, n_heads, 0.1 if drop_rate is None else drop_rate)
    if scratch_state is not None:
        optimizer_state = _scratch_optimizer_to_gptlib(path, scratch_state, optimizer_state, config)
    try:
        tokenizer = tokenizer_from_dict(stored_tokenizer if isinstance(stored_tokenizer, dict) else None)
    except ValueError as exc:
        raise CheckpointError(f"{path}: its stored tokenizer is unreadable: {exc}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{path}: the embedding ('tok_emb.weight') has {config.vocab_size:,} rows, fewer than the "
            f"{tokenizer.vocab_size:,} tokens of its tokenizer ({tokenizer.name}"
            f"{', assumed: the file stores none' if stored_tokenizer is None else ''}); ids above "
            f"{config.vocab_size - 1} would have no row. Use the checkpoint with the tokenizer it was trained "
            "with (save it with gptlib, which stores the tokenizer in the file)")
    return Checkpoint(config, state, optimizer_state, dict(train_state), source_format, tokenizer, labels)


def infer_config(path, state: dict, n_heads: int | None, drop_rate: float = 0.1) -> GPTConfig:
    """Model sizes from tensor shapes (gptlib names). The head count must be given."""
    try:
        vocab_size, emb_dim = state["tok_emb.weight"].shape
        context_length = state["pos_emb.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"{path}: tensor {exc.args[0]!r} is missing; cannot tell the model's size") from None
    n_layers = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if n_heads is None:
        raise CheckpointError(
            f"{path}: the checkpoint has no config, and the number of attention heads cannot be read from "
            f"tensor shapes: pass --n-heads (n_heads=...) with the value the model was trained with; it "
            f"must divide emb_dim={emb_dim}")
    if n_heads <= 0 or emb_dim % n_heads:
        raise CheckpointError(f"{path}: --n-heads {n_heads} does not divide the checkpoint's emb_dim {emb_dim}; "
                              f"pass a divisor of {emb_dim} (the value the model was trained with)")
    tied = "out_head.weight" not in state or state["out_head.weight"].data_ptr() == state["tok_emb.weight"].data_ptr()
    return GPTConfig(vocab_size=int(vocab_size), context_length=int(context_length), emb_dim=int(emb_dim),
                     n_heads=n_heads, n_layers=n_layers, drop_rate=drop_rate,
                     qkv_bias="blocks.0.att.qkv.bias" in state, tie_weights=tied)


def load_model(path, n_heads: int | None = None, device=None, drop_rate: float | None = None,
               config: GPTConfig | None = None) -> tuple[GPTModel, Checkpoint]:
    """Build a :class:`GPTModel` from any supported checkpoint; return it with the checkpoint's contents.

    With ``config`` given, the weights must fit it exactly (a clear error names the first tensor that does not).
    A LoRA adapter file gives its base model with the adapters merged in (see :func:`gptlib.lora.load_adapter`).
    """
    from .lora import is_adapter_file, load_adapter
    raw = _torch_load(path)
    if is_adapter_file(raw):
        return load_adapter(path, raw, device=device, n_heads=n_heads, drop_rate=drop_rate)
    ckpt = read_checkpoint(path, n_heads=n_heads, drop_rate=drop_rate, raw=raw)
    model = GPTModel(config or ckpt.config, tokenizer=ckpt.tokenizer)
    load_weights(model, ckpt.model_state, source=str(path))
    if device is not None:
        model.to(device)
    return model, ckpt


def load_weights(model: GPTModel, state: dict, source: str = "checkpoint") -> None:
    """``model.load_state_dict(state)``, with errors that name the tensor and both shapes."""
    expected = model.state_dict()
    if "out_head.weight" not in state and model.config.tie_weights:
        state = {**state, "out_head.weight": state.get("tok_emb.weight")}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{source}: does not match the model: missing tensors {missing[:3]}, "
                              f"unexpected tensors {unexpected[:3]}; was it saved from another configuration?")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(state[name].shape)} in the checkpoint but "
                f"{tuple(tensor.shape)} in the model built from the config; the config and checkpoint disagree")
    model.load_state_dict(state)


def _torch_load(path):
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc) or "Unsupported global" in str(exc):  # a class or function: the file wants to run code
            raise CheckpointError(
                f"{path}: holds pickled Python objects, not only tensors; gptlib loads with weights_only=True "
                "and refuses it, since such a file can run code. Re-save just the state_dict "
                "(torch.save(model.state_dict(), path)) from code you trust") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({unpickling_reason(exc)}); "
                              "was it saved with torch.save?") from None
    except Exception as exc:  # torch.load fails in many ways on a damaged file; each means "unreadable"
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, or a truncated copy ({detail}); "
                              "save it again with torch.save, or copy it again completely") from None


def _strip_prefixes(name: str) -> str:
    for prefix in _PREFIXES:
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _scratch_name_map(state: dict) -> list[tuple[str, str, int | None]]:
    """(their name, our name, qkv slice) for every parameter, in their model's parameter order."""
    n_layers = len({int(m.group(1)) for k in state if (m := re.match(r"trf_blocks\.(\d+)\.", k))})
    names = [("tok_emb.weight", "tok_emb.weight", None), ("pos_emb.weight", "pos_emb.weight", None)]
    for i in range(n_layers):
        names += [(f"trf_blocks.{i}.{theirs}", f"blocks.{i}.{ours}", part) for theirs, ours, part in _SCRATCH_BLOCK]
    names += [(k, v, None) for k, v in _SCRATCH_TOP.items() if not k.endswith("_emb.weight")]
    return [entry for entry in names if entry[0] in state]


def _scratch_state_to_gptlib(state: dict) -> dict:
    out, parts = {}, {}
    for theirs, ours, part in _scratch_name_map(state):
        if part is None:
            out[ours] = state[theirs]
        else:
            parts.setdefault(ours, [None, None, None])[part] = state[theirs]
    for ours, (q, k, v) in parts.items():
        out[ours] = torch.cat([q, k, v], dim=0)
    return out


def _scratch_optimizer_to_gptlib(path, state: dict, optimizer_state: dict | None,
                                 config: GPTConfig) -> dict | None:
    """Re-key an AdamW state saved over the "LLMs from scratch" model to gptlib's parameter order.

    Their optimizer indexes parameters in their model's registration order; gptlib's model registers
    them in another order and has one qkv tensor where theirs has three, so the three moment tensors
    are concatenated the same way as the weights.
    """
    if optimizer_state is None:
        return None
    if not isinstance(optimizer_state, dict) or "state" not in optimizer_state or "param_groups" not in optimizer_state:
        raise CheckpointError(f"{path}: 'optimizer_state_dict' is not an optimizer state_dict "
                              "(expected keys 'state' and 'param_groups')")
    theirs = _scratch_name_map(state)
    with torch.device("meta"):  # only the parameter names and their order: no memory, no init cost
        ours_order = [name for name, _ in GPTModel(config).named_parameters()]
    if len(theirs) != sum(len(g["params"]) for g in optimizer_state["param_groups"]):
        raise CheckpointError(f"{path}: the optimizer state covers a different number of parameters "
                              f"than the model ({len(theirs)}); it was saved with another model")
    our_index = {name: i for i, name in enumerate(ours_order)}
    missing = sorted({ours for _, ours, _ in theirs} - set(our_index))
    if missing:
        raise CheckpointError(f"{path}: the optimizer state has parameters the model lacks: {missing[:3]}")
    index_map = {i: (our_index[ours], part) for i, (_, ours, part) in enumerate(theirs)}  # theirs -> ours

    new_state: dict[int, dict] = {}
    pending: dict[int, dict[int, dict]] = {}
    for their_i, slot in optimizer_state["state"].items():
        our_i, part = index_map[int(their_i)]
        if part is None:
            new_state[our_i] = slot
        else:
            pending.setdefault(our_i, {})[part] = slot
    for our_i, slots in pending.items():
        if len(slots) != 3:
            raise CheckpointError(f"{path}: optimizer state has moments for only some of W_query/W_key/W_value")
        merged = {}
        for key, value in slots[0].items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                merged[key] = torch.cat([slots[p][key] for p in range(3)], dim=0)
            else:
                merged[key] = value
        new_state[our_i] = merged
    groups = []
    for group in optimizer_state["param_groups"]:
        params = sorted({index_map[int(i)][0] for i in group["params"]})
        groups.append({**group, "params": params})
    return {"state": new_state, "param_groups": groups}
