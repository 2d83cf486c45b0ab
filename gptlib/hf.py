"""Moving weights between gptlib and Hugging Face ``transformers`` (``GPT2LMHeadModel``).

``from_hf`` reads a GPT-2 model (an object or a local folder), ``to_hf`` writes a folder that ``transformers``
loads offline, tokenizer included, and ``load_pretrained("gpt2")`` fetches OpenAI's weights once and caches them.

The two models are the same network under other names. One difference matters: HF GPT-2 keeps its linear
layers as ``Conv1D``, whose weight is stored (in, out), the transpose of ``nn.Linear``'s (out, in).
``transformers`` is optional: ``pip install 'gptlib[hf]'``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from .config import GPTConfig
from .files import usual_permissions
from .errors import UserInputError
from .model import GPTModel
from .tokenizer import END_OF_TEXT, EOT_ID, GPT2, BPETokenizer, Tokenizer, bpe_ranks, bytes_to_unicode

INSTALL_HINT = "this needs Hugging Face transformers: pip install 'gptlib[hf]'"

# Hub repositories of OpenAI's four GPT-2 sizes.
PRETRAINED = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
              "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
PRETRAINED_FILES = ("config.json", "model.safetensors")

# gptlib name -> HF name, per block; True where HF's Conv1D stores the weight transposed.
_BLOCK = [
    ("norm1.weight", "ln_1.weight", False), ("norm1.bias", "ln_1.bias", False),
    ("att.qkv.weight", "attn.c_attn.weight", True), ("att.qkv.bias", "attn.c_attn.bias", False),
    ("att.out_proj.weight", "attn.c_proj.weight", True), ("att.out_proj.bias", "attn.c_proj.bias", False),
    ("norm2.weight", "ln_2.weight", False), ("norm2.bias", "ln_2.bias", False),
    ("ff.fc.weight", "mlp.c_fc.weight", True), ("ff.fc.bias", "mlp.c_fc.bias", False),
    ("ff.proj.weight", "mlp.c_proj.weight", True), ("ff.proj.bias", "mlp.c_proj.bias", False),
]
_TOP = [("tok_emb.weight", "transformer.wte.weight"), ("pos_emb.weight", "transformer.wpe.weight"),
        ("final_norm.weight", "transformer.ln_f.weight"), ("final_norm.bias", "transformer.ln_f.bias"),
        ("out_head.weight", "lm_head.weight")]


def _name_map(n_layers: int) -> list[tuple[str, str, bool]]:
    """(gptlib name, HF name, transposed) for every tensor of a model with ``n_layers`` blocks."""
    names = [(ours, theirs, False) for ours, theirs in _TOP]
    for i in range(n_layers):
        names += [(f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}", t) for ours, theirs, t in _BLOCK]
    return names


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise UserInputError(INSTALL_HINT) from None
    return transformers


# ---------------------------------------------------------------- configs

def config_from_hf(hf_config, source: str = "the Hugging Face model") -> GPTConfig:
    """A :class:`GPTConfig` from a ``GPT2Config``; refuses features gptlib's architecture does not have."""
    get = lambda name, default=None: getattr(hf_config, name, default)  # noqa: E731
    model_type = get("model_type")
    if model_type != "gpt2":
        raise UserInputError(f"{source}: is a {model_type!r} model; gptlib reads only GPT-2 (model_type 'gpt2')")
    problems = []
    if get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function={get('activation_function')!r} (gptlib uses tanh-approximated "
                        "GELU: 'gelu_new' or 'gelu_pytorch_tanh')")
    if abs(float(get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon={get('layer_norm_epsilon')} (gptlib's LayerNorms use 1e-5)")
    n_inner = get("n_inner")
    if n_inner is not None and n_inner != 4 * hf_config.n_embd:
        problems.append(f"n_inner={n_inner} (gptlib's MLP is 4 x n_embd = {4 * hf_config.n_embd})")
    for flag, meaning in (("scale_attn_by_inverse_layer_idx", "attention scaled by layer depth"),
                          ("reorder_and_upcast_attn", "attention reordered and upcast"),
                          ("add_cross_attention", "cross-attention to an encoder")):
        if get(flag, False):
            problems.append(f"{flag}=True ({meaning})")
    if not get("scale_attn_weights", True):
        problems.append("scale_attn_weights=False (gptlib always scales attention by 1/sqrt(head_dim))")
    if problems:
        raise UserInputError(f"{source}: uses what gptlib's GPT-2 does not have: {'; '.join(problems)}. "
                             "Only standard GPT-2 configurations convert")
    try:
        return GPTConfig(vocab_size=hf_config.vocab_size, context_length=hf_config.n_positions,
                         emb_dim=hf_config.n_embd, n_heads=hf_config.n_head, n_layers=hf_config.n_layer,
                         drop_rate=float(get("resid_pdrop", 0.1)), qkv_bias=True,  # GPT-2's c_attn has a bias
                         tie_weights=bool(get("tie_word_embeddings", True)))
    except ValueError as exc:
        raise UserInputError(f"{source}: its config does not make a valid gptlib model: {exc}") from None


def hf_config(config: GPTConfig, eot_id: int = EOT_ID):
    """The ``GPT2Config`` of a gptlib model: same sizes, one dropout rate for all three of GPT-2's."""
    transformers = require_transformers()
    return transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.emb_dim,
        n_layer=config.n_layers, n_head=config.n_heads, activation_function="gelu_new", layer_norm_epsilon=1e-5,
        resid_pdrop=config.drop_rate, embd_pdrop=config.drop_rate, attn_pdrop=config.drop_rate,
        bos_token_id=eot_id, eos_token_id=eot_id, tie_word_embeddings=config.tie_weights)


# ---------------------------------------------------------------- HF -> gptlib

def from_hf(model_or_directory) -> GPTModel:
    """A :class:`GPTModel` holding the weights of an HF ``GPT2LMHeadModel`` or of a local folder saved by one.

    A folder is read with ``local_files_only=True``: nothing is downloaded (see :func:`load_pretrained`).
    The result is in evaluation mode, in the source's dtype, on the CPU.
    """
    transformers = require_transformers()
    hf_model = model_or_directory
    copy = True  # a model the caller keeps must not share storage with ours
    if isinstance(model_or_directory, (str, os.PathLike)):
        hf_model, copy = _load_hf_directory(Path(model_or_directory), transformers), False
    if not isinstance(hf_model, transformers.GPT2LMHeadModel):
        raise UserInputError(f"from_hf takes a transformers GPT2LMHeadModel or a folder, got "
                             f"{type(hf_model).__name__}")
    config = config_from_hf(hf_model.config)
    theirs = hf_model.state_dict()
    state = {}
    for ours, name, transposed in _name_map(config.n_layers):
        if name not in theirs:
            if ours == "out_head.weight" and config.tie_weights:
                continue  # the tied head is the token embedding
            raise UserInputError(f"the Hugging Face model has no tensor {name!r}; is it a complete GPT2LMHeadModel?")
        tensor = theirs[name].detach().cpu()
        tensor = tensor.t() if transposed else tensor
        state[ours] = tensor.clone(memory_format=torch.contiguous_format) if copy else tensor.contiguous()
    if config.tie_weights:
        state["out_head.weight"] = state["tok_emb.weight"]
    tokenizer = None
    if isinstance(model_or_directory, (str, os.PathLike)) and config.vocab_size < GPT2.vocab_size:
        tokenizer = _folder_bpe(Path(model_or_directory))  # exported by gptlib with a trained BPE
    with torch.device("meta"):  # the weights come from HF: skip random initialisation
        model = GPTModel(config, tokenizer=tokenizer)
    model.load_state_dict(state, assign=True)
    if config.tie_weights:
        model.out_head.weight = model.tok_emb.weight  # assign=True replaced the shared Parameter: share again
    return model.eval()


def _folder_bpe(directory: Path) -> BPETokenizer | None:
    path = directory / "tokenizer.json"
    try:
        return BPETokenizer.load(path) if path.is_file() else None
    except ValueError:
        return None


def _load_hf_directory(directory: Path, transformers):
    if not directory.is_dir():
        raise UserInputError(f"{directory}: no such folder; expected a saved GPT-2 model "
                             "(config.json and model.safetensors)")
    if not (directory / "config.json").is_file():
        raise UserInputError(f"{directory}: has no config.json; is it a folder written by save_pretrained?")
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserInputError(f"{directory}/config.json: cannot be read: {_first_line(exc)}") from None
    config_from_hf(config, source=str(directory))  # refuse before reading any weights
    try:
        return transformers.GPT2LMHeadModel.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserInputError(f"{directory}: the weights cannot be loaded: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# ---------------------------------------------------------------- gptlib -> HF

def to_hf(model: GPTModel, directory=None, overwrite: bool = False):
    """An HF ``GPT2LMHeadModel`` with the same weights; with ``directory``, also a folder transformers loads.

    The folder holds config.json, model.safetensors and the model's tokenizer (GPT-2's files built from gptlib's
    own ranks, or a trained BPE as a ``PreTrainedTokenizerFast``), so ``GPT2LMHeadModel.from_pretrained(directory)``,
    ``AutoTokenizer.from_pretrained(directory)`` and ``pipeline("text-generation", model=directory)``
    work offline. It is written in a temporary sibling folder and renamed into place, so a failure leaves
    nothing half-written; an existing non-empty folder is replaced only with ``overwrite=True``.
    """
    transformers = require_transformers()
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    if getattr(model, "lora", None) is not None:
        raise UserInputError("the model has LoRA adapters: fold them in first (gptlib.lora.merge_lora(model))")
    config = model.config
    tokenizer = model.tokenizer if model.has_tokenizer else None
    if directory is not None:
        directory = check_target(Path(directory), overwrite)
        if tokenizer is None:
            raise UserInputError(f"the model's vocab_size {config.vocab_size} is smaller than GPT-2's "
                                 f"{GPT2.vocab_size} and it has no tokenizer of its own to export")
    ours = model.state_dict()
    dtype = ours["tok_emb.weight"].dtype
    state = {}
    for name, theirs, transposed in _name_map(config.n_layers):
        tensor = ours.get(name)
        if tensor is None:  # gptlib's qkv_bias=False: GPT-2 always has the bias, so it is zero
            tensor = torch.zeros(3 * config.emb_dim, dtype=dtype)
        tensor = tensor.detach().cpu()
        state[theirs] = (tensor.t() if transposed else tensor).contiguous()
    eot_id = tokenizer.eot_id if tokenizer is not None else EOT_ID
    hf_model = transformers.GPT2LMHeadModel(hf_config(config, eot_id)).to(dtype)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    # older transformers keep the causal mask as buffers named attn.bias / attn.masked_bias
    missing = [k for k in missing if not k.endswith(("attn.bias", "attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"gptlib -> HF name mapping is incomplete: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if config.tie_weights:
        hf_model.tie_weights()
    hf_model.eval()
    if directory is not None:
        _write_atomically(directory, overwrite, lambda tmp: _write_hf_folder(hf_model, config, tokenizer, tmp))
    return hf_model


def check_target(directory, overwrite: bool = False) -> Path:
    """Refuse a target folder ``to_hf`` cannot write: no parent folder, a file, or non-empty without ``overwrite``."""
    directory = Path(directory)
    if not directory.parent.is_dir():
        raise UserInputError(f"{directory}: the folder {directory.parent} does not exist; create it first")
    if directory.exists() and not directory.is_dir():
        raise UserInputError(f"{directory}: is a file, not a folder; choose another path")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise UserInputError(f"{directory}: the folder exists and is not empty; choose another folder "
                             "or pass overwrite=True (--overwrite) to replace it")
    return directory


def _write_atomically(directory: Path, overwrite: bool, write) -> None:
    """Build the folder beside ``directory``, then rename it into place (replacing an old one only when allowed)."""
    check_target(directory, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    old = None
    try:
        write(tmp)
        usual_permissions(tmp)  # mkdtemp makes the folder private, safetensors its file: give the usual ones
        if directory.exists():
            old = directory.with_name(f"{tmp.name}.old")
            os.rename(directory, old)
        try:
            os.rename(tmp, directory)
        except BaseException:
            if old is not None:
                os.rename(old, directory)  # put the previous folder back
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_hf_folder(hf_model, config: GPTConfig, tokenizer: Tokenizer, folder: Path) -> None:
    hf_model.save_pretrained(folder, safe_serialization=True)  # safetensors (the default from transformers 5 on)
    if isinstance(tokenizer, BPETokenizer):
        write_bpe_tokenizer_files(tokenizer, folder, model_max_length=config.context_length)
    else:
        write_tokenizer_files(folder, model_max_length=config.context_length)


def write_bpe_tokenizer_files(tokenizer: BPETokenizer, folder, model_max_length: int) -> None:
    """A trained byte-level BPE as a ``PreTrainedTokenizerFast`` (tokenizer.json and its config files)."""
    from transformers import PreTrainedTokenizerFast
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf_tokenizer, model_max_length=model_max_length,
                                   bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT,
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(folder)


# ---------------------------------------------------------------- the tokenizer, in HF's files

@lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's ``vocab.json`` (token string -> id) and ``merges.txt`` pairs, recovered from gptlib's ranks.

    tiktoken keeps only each token's rank. The merge that made a token is found by running BPE on the
    token's own bytes with the merges of lower rank: it stops with exactly two parts, the merged pair.
    """
    ranks = bpe_ranks()
    table = bytes_to_unicode()
    spell = lambda token: "".join(table[b] for b in token)  # noqa: E731
    vocab = {spell(token): rank for token, rank in ranks.items()}
    vocab[END_OF_TEXT] = EOT_ID
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe(token, ranks, max_rank=rank)
        if len(parts) != 2:
            raise RuntimeError(f"cannot recover the merge for token {token!r} (rank {rank}): got {parts}")
        merges.append((spell(parts[0]), spell(parts[1])))
    return vocab, merges


def _bpe(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Byte-pair merge ``token`` as tiktoken does, using only merges ranked below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            return parts
        parts[best:best + 2] = [parts[best] + parts[best + 1]]


def write_tokenizer_files(folder, model_max_length: int = 1024) -> None:
    """Write GPT-2's tokenizer for ``GPT2Tokenizer``/``GPT2TokenizerFast`` into ``folder``, built offline.

    vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, as in OpenAI's gpt2 repository,
    and tokenizer.json (the fast tokenizer in one file) when ``transformers`` is installed.
    """
    folder = Path(folder)
    vocab, merges = vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
                        "add_prefix_space": False, "add_bos_token": False, "errors": "replace",
                        "clean_up_tokenization_spaces": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    with contextlib.suppress(ImportError):
        from transformers import GPT2TokenizerFast
        fast = GPT2TokenizerFast.from_pretrained(folder, local_files_only=True)  # reads the files just written
        fast.backend_tokenizer.save(str(folder / "tokenizer.json"))


# ---------------------------------------------------------------- OpenAI's weights

def default_cache_dir() -> Path:
    """Where :func:`load_pretrained` keeps downloads: ``$GPTLIB_CACHE``, else ``~/.cache/gptlib``."""
    return Path(os.environ.get("GPTLIB_CACHE") or Path.home() / ".cache" / "gptlib")


def load_pretrained(name: str = "gpt2", cache_dir=None) -> GPTModel:
    """OpenAI's GPT-2 weights as a :class:`GPTModel`: "gpt2" (124M), "gpt2-medium", "gpt2-large" or "gpt2-xl", or
    a local folder that holds a saved GPT-2 (``config.json`` and ``model.safetensors``, as ``save_pretrained``
    writes them), which is read as it is.

    The first call for a name downloads config.json and model.safetensors from the Hugging Face Hub into
    ``<cache_dir>/<name>/``; later calls read them from there without the network. Offline, place those two
    files there yourself, or pass the folder that holds them.
    """
    if Path(name).is_dir():
        return from_hf(Path(name))
    if name not in PRETRAINED:
        raise UserInputError(f"unknown pretrained model {name!r}; choose one of {sorted(PRETRAINED)}, or give a "
                             "local folder with a saved GPT-2")
    require_transformers()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / name
    if not all((target / f).is_file() for f in PRETRAINED_FILES):
        _download(PRETRAINED[name], target)
    return from_hf(target)


def _download(repo_id: str, target: Path) -> None:
    how = (f"to use it offline, copy a downloaded {target.name!r} folder's config.json and model.safetensors "
           f"into {target} (or load any local folder with gptlib.hf.from_hf(path))")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_OFFLINE
    except ImportError:
        raise UserInputError(f"{INSTALL_HINT} (huggingface_hub is missing)") from None
    if HF_HUB_OFFLINE:
        raise UserInputError(f"{target} does not hold {' and '.join(PRETRAINED_FILES)}, and downloads are off "
                             f"(HF_HUB_OFFLINE is set); {how}")
    made = not target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
        snapshot_download(repo_id, local_dir=target, allow_patterns=list(PRETRAINED_FILES))
    except Exception as exc:  # the hub client fails in many ways (offline, DNS, HTTP, disk); each means "no files"
        if made:
            shutil.rmtree(target, ignore_errors=True)  # leave no empty folder that looks like a cache entry
        raise UserInputError(f"could not download {repo_id} into {target} ({_first_line(exc)}); {how}") from None
    missing = [f for f in PRETRAINED_FILES if not (target / f).is_file()]
    if missing:
        raise UserInputError(f"the download of {repo_id} into {target} lacks {missing}; {how}")
