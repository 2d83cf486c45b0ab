"""LoRA: fine-tune a frozen GPT through small low-rank adapters (Hu et al., 2021, "LoRA").

A linear layer ``y = W x`` becomes ``y = W x + (alpha / rank) * B A x``, where ``A`` is ``rank x in`` and ``B`` is
``out x rank``. ``W`` stays frozen; only ``A`` and ``B`` train. ``B`` starts at zero, so before the first step the
model is exactly the base model. The optimizer holds state for the adapters only, and the file saved is the
adapters only (an *adapter file*), with the path and sha256 of the base checkpoint it belongs to.

    model, _ = load_model("pretrained.pth")
    add_lora(model, LoRAConfig(rank=8), base="pretrained.pth")
    ... train(model, ...) ...           # saves an adapter file wherever it saves a checkpoint
    merge_lora(model)                   # fold B A into W: a plain GPTModel again, as fast as the base

The token embedding can be adapted too (target ``"emb"``, :class:`LoRAEmbedding`): a base that rarely saw the
fine-tuning text's words needs new embeddings, which adapters on the blocks alone cannot give it.

``load_model`` reads an adapter file directly: it loads the recorded base, checks its sha256, adds the adapters and
merges them (see :func:`load_adapter`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, UserInputError
from .files import file_sha256

ADAPTER_FORMAT = "gptlib-lora-adapter"

# short name -> the layer inside every transformer block (names as in gptlib.model); "emb" is the token embedding
TARGETS: dict[str, str] = {"qkv": "att.qkv", "out_proj": "att.out_proj", "fc": "ff.fc", "proj": "ff.proj",
                           "emb": "tok_emb"}
BLOCK_TARGETS = tuple(name for name in TARGETS if name != "emb")  # the layers inside every block
DEFAULT_TARGETS = ("qkv", "out_proj")  # the attention projections, as the LoRA paper adapted


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    emb_alpha: float | None = None  # the token embedding's adapter scale is emb_alpha / rank (default: alpha)

    def __post_init__(self):
        self.targets = tuple(dict.fromkeys(self.targets))
        if self.emb_alpha is not None and not self.emb_alpha > 0:
            raise UserInputError(f"LoRA embedding alpha must be positive, got {self.emb_alpha!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UserInputError(f"LoRA rank must be a positive whole number, got {self.rank!r}")
        if not self.alpha > 0:
            raise UserInputError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise UserInputError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise UserInputError(f"LoRA targets {list(unknown) or '(none)'} unknown; choose from {', '.join(TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def emb_scaling(self) -> float:
        return (self.alpha if self.emb_alpha is None else self.emb_alpha) / self.rank


@dataclass
class AdapterInfo:
    """What an adapted model knows about its adapters and the base they were trained on."""

    config: LoRAConfig
    base_path: str | None = None
    base_sha256: str | None = None


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``scaling * B A``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)  # as nn.Linear (and peft) do

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + self.scaling * update

    def merged(self) -> nn.Linear:
        """The base layer with ``scaling * B A`` folded into its weight (one matrix, no adapter cost)."""
        with torch.no_grad():
            self.base.weight += self.scaling * (self.lora_B @ self.lora_A).to(self.base.weight.dtype)
        return self.base


class LoRAEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` plus a trainable low-rank update: row ``i`` gains ``scaling * B A[:, i]``.

    As in ``peft``, ``A`` (rank x vocab) starts at zero and ``B`` (dim x rank) at random, so training starts from the
    base model. A row lookup in ``A`` costs nothing per token, so adapting a 50,000-row vocabulary is cheap.
    ``weight`` is the whole adapted matrix, which a tied LM head reads (see :class:`TiedLoRAHead`).
    """

    def __init__(self, base: nn.Embedding, rank: int, scaling: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.scaling = scaling
        weight = base.weight
        self.lora_A = nn.Parameter(torch.zeros(rank, base.num_embeddings, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.empty(base.embedding_dim, rank, device=weight.device, dtype=weight.dtype))
        nn.init.normal_(self.lora_B, generator=generator)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        update = nn.functional.embedding(ids, self.lora_A.T) @ self.lora_B.T  # (..., rank) @ (rank, dim)
        return self.base(ids) + self.scaling * update

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight + self.scaling * (self.lora_B @ self.lora_A).T

    def merged(self) -> nn.Embedding:
        with torch.no_grad():
            self.base.weight += self.scaling * (self.lora_B @ self.lora_A).T.to(self.base.weight.dtype)
        return self.base


class TiedLoRAHead(nn.Module):
    """The LM head of a model whose head is tied to an adapted token embedding: it reads the adapted matrix, so the
    adapter acts on both ends of the model, exactly as the merged weights will."""

    def __init__(self, base: nn.Linear, embedding: LoRAEmbedding):
        super().__init__()
        self.base = base  # its weight is the embedding's base weight (frozen); merging updates both in place
        self._embedding = (embedding,)  # a tuple: not a second registered copy of the embedding's parameters

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self.weight)

    def merged(self) -> nn.Linear:
        return self.base


def _target_layers(model, targets) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute name, full name) of every block layer to adapt, block by block."""
    layers = []
    for b, block in enumerate(model.blocks):
        for target in targets:
            if target in BLOCK_TARGETS:
                parent_name, attr = TARGETS[target].split(".")
                layers.append((getattr(block, parent_name), attr, f"blocks.{b}.{TARGETS[target]}"))
    return layers


def add_lora(model, config: LoRAConfig | None = None, base=None, seed: int = 0) -> int:
    """Freeze every weight of ``model`` and add adapters to the target layers of every block, in place.

    ``base`` is the checkpoint the model was loaded from: its path and sha256 go into every adapter file saved
    from this model, so the adapter is never applied to another base. ``seed`` alone decides the adapters' first
    values (the global random state is left alone), so a run is repeatable. Returns the number of trainable
    parameters.
    """
    config = config or LoRAConfig()
    if is_adapted(model):
        raise UserInputError("this model already has LoRA adapters; merge them first (merge_lora)")
    model.requires_grad_(False)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for parent, attr, _ in _target_layers(model, config.targets):
        setattr(parent, attr, LoRALinear(getattr(parent, attr), config.rank, config.alpha, config.dropout, generator))
    if "emb" in config.targets:
        tied = model.out_head.weight is model.tok_emb.weight
        model.tok_emb = LoRAEmbedding(model.tok_emb, config.rank, config.emb_scaling, generator)
        if tied:
            model.out_head = TiedLoRAHead(model.out_head, model.tok_emb)
    info = AdapterInfo(config)
    if base is not None:
        info.base_path, info.base_sha256 = str(Path(base).resolve()), file_sha256(Path(base))
    model.lora = info
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def is_adapted(model) -> bool:
    return getattr(model, "lora", None) is not None


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors (``blocks.0.att.qkv.lora_A``, ...)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if ".lora_" in name}


def merge_lora(model):
    """Fold every adapter into its base weight and make all weights trainable again: a plain GPTModel, in place."""
    if not is_adapted(model):
        raise UserInputError("this model has no LoRA adapters to merge")
    for parent, attr, _ in _target_layers(model, model.lora.config.targets):
        setattr(parent, attr, getattr(parent, attr).merged())
    if isinstance(model.tok_emb, LoRAEmbedding):
        model.tok_emb = model.tok_emb.merged()
    if isinstance(model.out_head, TiedLoRAHead):
        model.out_head = model.out_head.merged()
    model.lora = None
    model.requires_grad_(True)
    return model


def adapter_payload(model) -> dict:
    """What an adapter file holds (see :func:`gptlib.checkpoint.save_checkpoint`, which writes it)."""
    info: AdapterInfo = model.lora
    return {"format": ADAPTER_FORMAT, "lora": {**asdict(info.config), "targets": list(info.config.targets)},
            "base": {"path": info.base_path, "sha256": info.base_sha256},
            "config": model.config.to_dict(), "adapter_state_dict": adapter_state_dict(model)}


def is_adapter_file(raw) -> bool:
    return isinstance(raw, dict) and raw.get("format") == ADAPTER_FORMAT


def read_adapter(path, raw: dict) -> tuple[LoRAConfig, dict, dict]:
    """Check an adapter file's fields; return (LoRA config, base record, adapter tensors)."""
    try:
        lora = dict(raw["lora"])
        emb_alpha = lora.get("emb_alpha")  # absent in files written before embedding adapters existed
        config = LoRAConfig(int(lora["rank"]), float(lora["alpha"]), float(lora["dropout"]), tuple(lora["targets"]),
                            None if emb_alpha is None else float(emb_alpha))
        base, state = dict(raw["base"]), raw["adapter_state_dict"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: an adapter file with a missing or malformed field ({exc})") from None
    except UserInputError as exc:
        raise CheckpointError(f"{path}: its LoRA settings are invalid: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'adapter_state_dict' is not a dict of tensors")
    return config, base, state


def find_base(path, base_record: dict, base=None) -> Path:
    """The base checkpoint for the adapter at ``path``: ``base`` if given, else the recorded path; its sha256 must
    match the recorded one."""
    recorded, digest = base_record.get("path"), base_record.get("sha256")
    candidate = Path(base) if base is not None else (Path(recorded) if recorded else None)
    if candidate is None:
        raise CheckpointError(f"{path}: is a LoRA adapter that records no base checkpoint; pass --base with the "
                              "checkpoint it was trained on")
    if not candidate.is_file():
        raise CheckpointError(f"{path}: is a LoRA adapter for the base checkpoint {candidate}, which does not exist "
                              "here; pass --base with a copy of that checkpoint")
    if digest and file_sha256(candidate) != digest:
        raise CheckpointError(f"{path}: is a LoRA adapter trained on a base with sha256 {digest[:12]}..., but "
                              f"{candidate} has sha256 {file_sha256(candidate)[:12]}...; an adapter only fits the "
                              f"exact weights it was trained on (recorded base: {recorded})")
    return candidate


def load_adapter(path, raw: dict | None = None, base=None, merge: bool = True, device=None,
                 n_heads: int | None = None, drop_rate: float | None = None):
    """Load the base an adapter file records (checked by sha256), add the adapters, and by default merge them.

    Returns ``(model, checkpoint of the base)``. With ``merge=False`` the model keeps its adapters (to train on).
    The adapter file also records its base's config, so a base without one (an "LLMs from scratch" file) needs no
    ``n_heads``; one given must agree with the record.
    """
    from .checkpoint import _torch_load, check_finite_tensors, load_model
    raw = _torch_load(path) if raw is None else raw
    config, base_record, state = read_adapter(path, raw)
    check_finite_tensors(path, state, None)
    base_path = find_base(path, base_record, base)
    recorded = raw.get("config") if isinstance(raw.get("config"), dict) else {}
    recorded_heads, recorded_drop = recorded.get("n_heads"), recorded.get("drop_rate")
    if n_heads is not None and isinstance(recorded_heads, int) and n_heads != recorded_heads:
        raise CheckpointError(f"{path}: the adapter was trained on a base with {recorded_heads} attention heads, "
                              f"but n_heads={n_heads} was given (--n-heads); leave it out, the adapter records it")
    model, ckpt = load_model(base_path, n_heads=n_heads if n_heads is not None else recorded_heads,
                             drop_rate=drop_rate if drop_rate is not None else recorded_drop)
    add_lora(model, config)
    model.lora.base_path, model.lora.base_sha256 = str(base_path.resolve()), base_record.get("sha256")
    expected = adapter_state_dict(model)
    if set(expected) != set(state):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise CheckpointError(f"{path}: its adapters do not fit the base {base_path}: missing {missing[:2]}, "
                              f"unexpected {unexpected[:2]}")
    for name, tensor in expected.items():
        if tensor.shape != state[name].shape:
            raise CheckpointError(f"{path}: adapter tensor {name!r} has shape {tuple(state[name].shape)}, the base "
                                  f"{base_path} needs {tuple(tensor.shape)}")
    model.load_state_dict(state, strict=False)
    if merge:
        merge_lora(model)
    if device is not None:
        model.to(device)
    return model, ckpt
