"""Whole workflows behind the command line: fine-tune a checkpoint on a JSONL file, pretrain on text.

Each run checks every input before it writes anything, saves progress to ``<out>.progress.pth`` while it
trains (so ``resume=True`` can continue after a crash or Ctrl-C), and only at the end writes its outputs,
each atomically: ``<out>.pth``, ``<out>.loss.png`` and ``<out>.metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .checkpoint import GPTModel, load_model, read_checkpoint, save_checkpoint
from .config import PRESETS, preset
from .data import InstructionCollator, InstructionDataset, instruction_loader, window_loader
from . import distributed
from .device import pick_device, set_seed
from .distributed import World
from .errors import DataError, UserInputError
from .evaluate import evaluate_loss, perplexity
from .files import RunLock, atomic_write, file_sha256, same_file
from .guards import check_loader_tokens, check_model_fits, check_options
from .instructions import load_jsonl, split_examples
from .lora import DEFAULT_TARGETS, LoRAConfig, add_lora, is_adapter_file, load_adapter
from .model import IGNORE_INDEX
from .tokenizer import EOT_ID, GPT2, BPETokenizer, Tokenizer, train_bpe
from .train import TrainConfig, resolve_precision, train


@dataclass
class RunPaths:
    out: Path

    @property
    def progress(self) -> Path:
        return self.out.with_name(self.out.stem + ".progress.pth")

    @property
    def plot(self) -> Path:
        return self.out.with_suffix(".loss.png")

    @property
    def metrics(self) -> Path:
        return self.out.with_suffix(".metrics.json")


def check_output(out: Path, inputs: list[Path], overwrite: bool, resume: bool, lock: RunLock | None = None) -> RunPaths:
    """Refuse an output path that cannot or should not be written, before any work starts.

    With ``lock`` the run claims ``out`` before looking at what exists there, so no other run can write it meanwhile.
    """
    out = Path(out)
    if out.suffix != ".pth":
        raise UserInputError(f"--out {out}: give a file name ending in .pth")
    if not out.parent.is_dir():
        raise UserInputError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise UserInputError(f"--out {out}: the folder {out.parent} is not writable")
    if out.is_dir():
        raise UserInputError(f"--out {out}: is a directory; give a file name ending in .pth")
    if lock is not None:
        lock.acquire()
    for path in inputs:
        if path.exists() and out.resolve() == path.resolve():
            raise UserInputError(f"--out {out}: would overwrite the input {path}; choose another name")
    if out.exists() and not overwrite:
        raise UserInputError(f"--out {out}: already exists; pass --overwrite to replace it (only when the run succeeds)")
    paths = RunPaths(out)
    _check_run_files(paths, inputs, overwrite, resume)
    if resume and not paths.progress.exists():
        raise UserInputError(f"--resume: there is no progress file {paths.progress} to resume from; "
                             "start the run without --resume")
    return paths


def _check_run_files(paths: RunPaths, inputs: list[Path], overwrite: bool, resume: bool) -> None:
    """The files a run writes beside OUT follow OUT's rules: never one of the run's inputs, never an existing file
    replaced without --overwrite (and the progress file of an unfinished run only with --resume or --overwrite)."""
    written = {"the progress file": paths.progress, "the loss plot": paths.plot, "the metrics file": paths.metrics}
    for what, path in written.items():
        for source in inputs:
            if source.exists() and same_file(source, path):
                raise UserInputError(f"{source}: is {what} of --out {paths.out}, which this run writes over (and "
                                     "deletes, for the progress file); copy it to another name and give that, "
                                     "or choose another --out")
    for what in ("the loss plot", "the metrics file"):
        if written[what].exists() and not overwrite:
            raise UserInputError(f"--out {paths.out}: {what} {written[what]} already exists; pass --overwrite to "
                                 "replace it (only when the run succeeds), or choose another --out")
    if paths.progress.exists() and not (resume or overwrite):
        raise UserInputError(f"--out {paths.out}: {paths.progress} holds the progress of an unfinished run; pass "
                             "--resume to continue it, or --overwrite to start again")


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:
            flag = "--" + name.replace("_", "-")
            raise UserInputError(f"{flag} must be positive, got {value}")


def _resume_checkpoint(paths: RunPaths, data_hash: str, classifier: bool = False):
    ckpt = read_checkpoint(paths.progress, allow_classifier=classifier)
    _check_resumable(paths, ckpt.train_state, ckpt.optimizer_state, data_hash)
    return ckpt


def _check_resumable(paths: RunPaths, state: dict, optimizer_state, data_hash: str) -> None:
    """A progress file can be resumed when it holds training and optimizer state for this data file."""
    if not state or optimizer_state is None:
        raise UserInputError(f"{paths.progress}: holds no training state to resume from")
    if state.get("data_sha256") not in (None, data_hash):
        raise UserInputError(f"--resume: {paths.progress} was trained on other data (the data file changed); "
                             "start a new run without --resume")


def _finish(model: GPTModel, result, paths: RunPaths, metrics: dict, title: str) -> dict:
    from .plots import plot_losses
    metrics.update(steps=result.steps, best_val_loss=result.best_val_loss, seconds=round(result.seconds, 1),
                   history=result.history, outputs={"checkpoint": str(paths.out), "plot": str(paths.plot),
                                                    "metrics": str(paths.metrics)})
    save_checkpoint(paths.out, model, None, {"history": result.history, "steps": result.steps})
    ax = plot_losses(result.history, title=title, path=paths.plot)
    import matplotlib.pyplot as plt
    plt.close(ax.figure)
    atomic_write(paths.metrics, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
    paths.progress.unlink(missing_ok=True)
    return metrics


# ---------------------------------------------------------------- how a run uses its hardware

@dataclass(kw_only=True)
class HardwareOptions:
    """Where and how a training run computes; shared by every recipe (each command's --device ... flags)."""
    device: str = "auto"                 # "auto": CUDA, then Apple's MPS, then the CPU (torchrun: each its own GPU)
    precision: str = "auto"              # see gptlib.train.resolve_precision
    micro_batch_size: int | None = None  # at most this many examples per forward pass and process (None: all)
    compile: bool = False                # torch.compile the training step
    backend: str = "auto"                # under torchrun: gloo on CPUs, nccl on GPUs


def _train_config(opts, world: World, **values) -> TrainConfig:
    """A TrainConfig with the run's hardware options."""
    return TrainConfig(seed=opts.seed, device=str(world.device), precision=opts.precision,
                       micro_batch_size=opts.micro_batch_size, compile=opts.compile, progress=opts.progress, **values)


def _where(world: World, precision: str) -> str:
    """"cpu, fp32", or "2 processes on cpu, fp32" under torchrun."""
    processes = f"{world.size} processes on " if world.distributed else ""
    return f"{processes}{world.device}, {resolve_precision(world.device, precision)}"


def _quiet(*args, **kwargs) -> None:
    """The log of a process other than rank 0: rank 0 says it all once."""


# ---------------------------------------------------------------- fine-tuning

@dataclass
class FinetuneOptions(HardwareOptions):
    checkpoint: Path
    data: Path
    out: Path
    n_heads: int | None = None
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    epochs: int = 4
    max_steps: int | None = None
    eval_every: int = 50
    save_every: int | None = None
    warmup_steps: int = 0
    schedule: str = "constant"        # or "cosine" (see gptlib.train.learning_rate)
    mask_prompt: bool = True
    truncation: str = "right"
    drop_rate: float | None = None
    resume: bool = False
    overwrite: bool = False
    seed: int = 123
    progress: bool = True
    lora_rank: int | None = None      # train LoRA adapters of this rank instead of every weight
    lora_alpha: float | None = None   # None: twice the rank
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_emb_alpha: float | None = None  # None: lora_alpha


def count_trainable(examples, max_length: int, mask_prompt: bool, truncation: str, tokenizer: Tokenizer = GPT2) -> int:
    """How many examples keep at least one labelled token after truncation to ``max_length``."""
    collator = InstructionCollator(max_length, mask_prompt=mask_prompt, truncation=truncation)
    dataset = InstructionDataset(examples, tokenizer)
    return sum(any(label != IGNORE_INDEX for label in collator.inputs_and_labels(item)[1]) for item in dataset)


def finetune(opts: FinetuneOptions, log=print) -> dict:
    """Fine-tune a checkpoint on instruction data; return the metrics (also written as JSON).

    The run holds a lock beside OUT (``OUT.lock``) from its first look at OUT to its last write. Started by
    torchrun, it trains with the other processes (see gptlib.distributed); rank 0 alone logs and writes, and the
    other ranks return ``{"rank": rank}``.
    """
    with distributed.session(opts.device, opts.backend) as world, RunLock(opts.out) as lock:
        return _finetune(opts, log if world.is_main else _quiet, lock if world.is_main else None, world)


def _finetune(opts: FinetuneOptions, log=print, lock: RunLock | None = None, world: World | None = None) -> dict:
    world = world or World(device=pick_device(opts.device))
    opts.checkpoint, opts.data, opts.out = Path(opts.checkpoint), Path(opts.data), Path(opts.out)
    check_options(asdict(opts))
    _check_positive(batch_size=opts.batch_size, lr=opts.lr, epochs=opts.epochs, max_steps=opts.max_steps,
                    eval_every=opts.eval_every, save_every=opts.save_every)
    if opts.weight_decay < 0:
        raise UserInputError(f"--weight-decay must be zero or positive, got {opts.weight_decay}")
    world.check_batch_size(opts.batch_size)
    paths = check_output(opts.out, [opts.checkpoint, opts.data], opts.overwrite, opts.resume, lock)
    examples = load_jsonl(opts.data)
    split = split_examples(examples, seed=opts.seed)
    data_hash = file_sha256(opts.data)

    lora = _lora_config(opts)
    if opts.resume and lora is not None:
        model, resume = _resume_lora(paths, data_hash)
    elif opts.resume:
        resume = _resume_checkpoint(paths, data_hash)
        model = GPTModel(resume.config, tokenizer=resume.tokenizer)
    else:
        resume = None
        model, _ = load_model(opts.checkpoint, n_heads=opts.n_heads, drop_rate=opts.drop_rate)
        if lora is not None:
            add_lora(model, lora, base=opts.checkpoint, seed=opts.seed)  # OUT will be an adapter file recording this base
    max_length = model.config.context_length
    usable = count_trainable(split.train, max_length, opts.mask_prompt, opts.truncation, model.tokenizer)
    if usable == 0:
        raise DataError(f"{opts.data}: every training example is longer than the model's context "
                        f"({max_length} tokens) before its response starts, so nothing is left to learn from; "
                        "shorten the prompts or use --truncation left")
    if usable < len(split.train):
        log(f"note: {len(split.train) - usable} of {len(split.train)} training examples lose their whole "
            f"response to truncation at {max_length} tokens and teach nothing", file=sys.stderr)

    set_seed(opts.seed)
    device = world.device
    model.to(device)
    make = dict(max_length=max_length, mask_prompt=opts.mask_prompt, truncation=opts.truncation, seed=opts.seed,
                tokenizer=model.tokenizer)  # the checkpoint's own tokenizer, kept in the fine-tuned file
    train_loader = instruction_loader(split.train, opts.batch_size, shuffle=True, **make)
    val_loader = instruction_loader(split.val, opts.batch_size, shuffle=False, **make)
    test_loader = instruction_loader(split.test, opts.batch_size, shuffle=False, **make)
    check_loader_tokens([train_loader, val_loader, test_loader], model.config.vocab_size, opts.data)
    log(f"data: {len(split.train)} train / {len(split.val)} validation / {len(split.test)} test examples "
        f"from {opts.data}; model: {model.num_parameters():,} parameters, tokenizer {model.tokenizer.name}, on "
        f"{_where(world, opts.precision)}")
    trainable = model.num_parameters(trainable_only=True)
    if lora is not None:
        emb = f" (embedding {lora.emb_alpha:g})" if lora.emb_alpha is not None else ""
        log(f"LoRA rank {lora.rank}, alpha {lora.alpha:g}{emb} on {', '.join(lora.targets)}: {trainable:,} trainable "
            f"parameters ({trainable / (model.num_parameters() - trainable):.2%} of the base's); OUT will hold the "
            "adapters only")

    if resume is not None:
        test_before = resume.train_state["test_loss_before"]
    else:
        test_before = evaluate_loss(model, test_loader, device=device)
    cfg = _train_config(opts, world, epochs=opts.epochs, max_steps=opts.max_steps, lr=opts.lr,
                        weight_decay=opts.weight_decay, betas=(0.9, 0.999), warmup_steps=opts.warmup_steps,
                        schedule=opts.schedule, eval_every=opts.eval_every, eval_batches=None,
                        checkpoint_path=str(paths.progress), save_every=opts.save_every)
    result = train(model, train_loader, val_loader, cfg, resume=resume, world=world,
                   extra_state={"data_sha256": data_hash, "test_loss_before": test_before})
    _note_skipped(result, log)
    if result.interrupted or not world.is_main:
        return _stopped(result, paths, world)
    test_after = evaluate_loss(model, test_loader, device=device)
    log(f"test-split response loss: {test_before:.3f} -> {test_after:.3f} "
        f"(perplexity {perplexity(test_before):.1f} -> {perplexity(test_after):.1f})")
    metrics = {"command": "finetune", "base_checkpoint": str(opts.checkpoint), "data": str(opts.data),
               "data_sha256": data_hash, "examples": {"train": len(split.train), "val": len(split.val),
                                                      "test": len(split.test)},
               "test_loss_before": test_before, "test_loss_after": test_after,
               "test_perplexity_before": perplexity(test_before), "test_perplexity_after": perplexity(test_after),
               "precision": result.precision, "trainable_parameters": trainable, **_run_facts(result, world),
               "options": _plain_options(opts)}
    if lora is not None:
        metrics["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "emb_alpha": lora.emb_alpha,
                           "dropout": lora.dropout, "targets": list(lora.targets), "base_sha256": model.lora.base_sha256}
    return _finish(model, result, paths, metrics, title=f"Fine-tuning on {opts.data.name}")


def _lora_config(opts: FinetuneOptions) -> LoRAConfig | None:
    """The run's LoRA settings, or None for a full fine-tune (LoRA flags without --lora-rank are an error)."""
    if opts.lora_rank is None:
        if (opts.lora_alpha is not None or opts.lora_dropout or tuple(opts.lora_targets) != DEFAULT_TARGETS
                or opts.lora_emb_alpha is not None):
            raise UserInputError("--lora-alpha, --lora-emb-alpha, --lora-dropout and --lora-targets need --lora-rank")
        return None
    if opts.lora_emb_alpha is not None and "emb" not in opts.lora_targets:
        raise UserInputError("--lora-emb-alpha sets the embedding adapter's scale: add emb to --lora-targets")
    alpha = 2.0 * opts.lora_rank if opts.lora_alpha is None else opts.lora_alpha
    return LoRAConfig(opts.lora_rank, alpha, opts.lora_dropout, tuple(opts.lora_targets), opts.lora_emb_alpha)


def _resume_lora(paths: RunPaths, data_hash: str):
    """Resume a LoRA run: its progress file is an adapter file, with the optimizer state of the adapters."""
    from .checkpoint import Checkpoint, _torch_load
    raw = _torch_load(paths.progress)
    if not is_adapter_file(raw):
        raise UserInputError(f"--resume: {paths.progress} is not a LoRA progress file; drop the --lora flags to "
                             "resume a full fine-tune, or start over without --resume")
    state = raw.get("train_state") or {}
    _check_resumable(paths, state, raw.get("optimizer_state_dict"), data_hash)
    model, _ = load_adapter(paths.progress, raw, merge=False)
    return model, Checkpoint(model.config, model.state_dict(), raw["optimizer_state_dict"], dict(state),
                             tokenizer=model.tokenizer)


# ---------------------------------------------------------------- pretraining

@dataclass
class PretrainOptions(HardwareOptions):
    data: Path
    out: Path
    preset: str = "tiny"
    context_length: int | None = None
    emb_dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    drop_rate: float | None = None
    tokenizer: Path | None = None    # a tokenizer.json to use; None: GPT-2's, or a new one with vocab_size
    vocab_size: int | None = None    # train a byte-level BPE of this size on the training text
    val_data: Path | None = None
    val_fraction: float = 0.1
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.1
    epochs: int = 1
    max_steps: int | None = None
    warmup_steps: int = 50
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int | None = None
    resume: bool = False
    overwrite: bool = False
    seed: int = 123
    progress: bool = True


def read_text(path: Path) -> str:
    """A .txt file, or every .txt file of a folder (sorted), joined with <|endoftext|>."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: the folder holds no .txt files")
    texts = []
    for file in files:
        raw = file.read_bytes()
        try:
            texts.append(raw.decode("utf-8").removeprefix("\ufeff").replace("\r\n", "\n"))  # as if saved on Linux
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise DataError(f"{file}:{line}: not valid UTF-8 (byte offset {exc.start}); save the text as UTF-8") from None
    text = "<|endoftext|>".join(t for t in texts if t.strip())
    if not text.strip():
        raise DataError(f"{path}: holds no text")
    return text


def pretrain(opts: PretrainOptions, log=print) -> dict:
    """Pretrain a fresh model on plain text; return the metrics (also written as JSON).

    The run holds a lock beside OUT (``OUT.lock``) from its first look at OUT to its last write; under torchrun
    rank 0 alone logs and writes (see :func:`finetune`).
    """
    with distributed.session(opts.device, opts.backend) as world, RunLock(opts.out) as lock:
        return _pretrain(opts, log if world.is_main else _quiet, lock if world.is_main else None, world)


def _pretrain(opts: PretrainOptions, log=print, lock: RunLock | None = None, world: World | None = None) -> dict:
    world = world or World(device=pick_device(opts.device))
    opts.data, opts.out = Path(opts.data), Path(opts.out)
    check_options(asdict(opts))
    _check_positive(batch_size=opts.batch_size, lr=opts.lr, epochs=opts.epochs, max_steps=opts.max_steps,
                    eval_every=opts.eval_every, save_every=opts.save_every)
    if opts.preset not in PRESETS:
        raise UserInputError(f"--preset {opts.preset}: unknown; choose one of {', '.join(PRESETS)}")
    overrides = {k: getattr(opts, k) for k in ("context_length", "emb_dim", "n_layers", "n_heads", "drop_rate")
                 if getattr(opts, k) is not None}
    try:
        config = preset(opts.preset, **overrides)
    except ValueError as exc:
        raise UserInputError(f"model size: {exc}") from None
    check_model_fits(config)
    world.check_batch_size(opts.batch_size)
    if opts.tokenizer is not None and opts.vocab_size is not None:
        raise UserInputError("give --tokenizer (a tokenizer.json) or --vocab-size (train one here), not both")
    inputs = [opts.data] + ([Path(opts.val_data)] if opts.val_data else []) + \
        ([Path(opts.tokenizer)] if opts.tokenizer else [])
    paths = check_output(opts.out, inputs, opts.overwrite, opts.resume, lock)
    text = read_text(opts.data)
    data_hash = hashlib.sha256(text.encode()).hexdigest()
    resume = _resume_checkpoint(paths, data_hash) if opts.resume else None
    tokenizer = resume.tokenizer if resume is not None else _pretrain_tokenizer(opts, text, log)
    config.vocab_size = tokenizer.vocab_size  # one embedding row per token
    ids = tokenizer.encode(text)
    if opts.val_data:
        train_ids, val_ids = ids, tokenizer.encode(read_text(Path(opts.val_data)))
    else:
        if not 0 < opts.val_fraction < 1:
            raise UserInputError(f"--val-fraction must be between 0 and 1, got {opts.val_fraction}")
        cut = int(len(ids) * (1 - opts.val_fraction))
        train_ids, val_ids = ids[:cut], ids[cut:]
    ctx = config.context_length
    for name, part in (("training", train_ids), ("validation", val_ids)):
        if len(part) < ctx + 1:
            raise DataError(f"{opts.data}: the {name} text has {len(part)} tokens, fewer than one window of "
                            f"{ctx} + 1; give more text or a smaller --context-length")

    set_seed(opts.seed)
    model = GPTModel(resume.config if resume is not None else config, tokenizer=tokenizer)
    train_loader = window_loader(train_ids, ctx, opts.batch_size, shuffle=True, seed=opts.seed)
    val_loader = window_loader(val_ids, ctx, opts.batch_size, shuffle=False)
    check_loader_tokens([train_loader, val_loader], model.config.vocab_size, opts.data)
    log(f"data: {len(train_ids):,} training and {len(val_ids):,} validation tokens ({tokenizer.name}); model: "
        f"{model.num_parameters():,} parameters on {_where(world, opts.precision)}")
    cfg = _train_config(opts, world, epochs=opts.epochs, max_steps=opts.max_steps, lr=opts.lr,
                        weight_decay=opts.weight_decay, warmup_steps=opts.warmup_steps, eval_every=opts.eval_every,
                        eval_batches=opts.eval_batches, checkpoint_path=str(paths.progress),
                        save_every=opts.save_every)
    result = train(model, train_loader, val_loader, cfg, resume=resume, world=world,
                   extra_state={"data_sha256": data_hash})
    _note_skipped(result, log)
    if result.interrupted or not world.is_main:
        return _stopped(result, paths, world)
    metrics = {"command": "pretrain", "data": str(opts.data), "config": model.config.to_dict(),
               "tokens": {"train": len(train_ids), "val": len(val_ids)},
               "final_val_loss": result.history["val_loss"][-1], "precision": result.precision,
               **_run_facts(result, world),
               "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size},
               "options": _plain_options(opts)}
    return _finish(model, result, paths, metrics, title=f"Pretraining on {opts.data.name}")


def _pretrain_tokenizer(opts: PretrainOptions, text: str, log) -> Tokenizer:
    """GPT-2's, a tokenizer.json given with --tokenizer, or a BPE of --vocab-size trained on the text now."""
    if opts.tokenizer is not None:
        try:
            return BPETokenizer.load(opts.tokenizer)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UserInputError(f"--tokenizer {opts.tokenizer}: {exc}") from None
    if opts.vocab_size is not None:
        try:
            tokenizer = train_bpe([text], opts.vocab_size)
        except ValueError as exc:
            raise UserInputError(f"--vocab-size: {exc}") from None
        log(f"trained a byte-level BPE of {tokenizer.vocab_size:,} tokens on {opts.data}")
        return tokenizer
    return GPT2


# ---------------------------------------------------------------- classification

@dataclass
class ClassifierOptions(HardwareOptions):
    checkpoint: Path
    data: Path                # text/label JSONL, or sarcasm pairs (see gptlib.classify.read_classification_data)
    out: Path
    n_heads: int | None = None
    train: str = "all"        # "head", "all" or a number of last blocks (as text, from the command line)
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.1
    epochs: int = 8
    max_steps: int | None = None
    warmup_steps: int = 20
    eval_every: int = 25
    patience: int | None = 3  # stop after this many evaluations without a better validation loss
    drop_rate: float | None = None
    resume: bool = False
    overwrite: bool = False
    seed: int = 123
    progress: bool = True


def train_classifier(opts: ClassifierOptions, log=print) -> dict:
    """Train a classification head (and as much of the GPT as ``opts.train`` says) on labelled texts.

    The data is split 85/10/5 by group (both answers of a sarcasm pair stay together); the test split's accuracy,
    precision, recall and F1 are reported and written with the checkpoint, which records the label names.
    """
    with distributed.session(opts.device, opts.backend) as world, RunLock(opts.out) as lock:
        return _train_classifier(opts, log if world.is_main else _quiet, lock if world.is_main else None, world)


def _train_classifier(opts: ClassifierOptions, log=print, lock: RunLock | None = None,
                      world: World | None = None) -> dict:
    world = world or World(device=pick_device(opts.device))
    from .classify import (GPTClassifier, choose_trainable, classification_loader, predict_proba,
                           read_classification_data, split_by_group)
    from .evaluate import classification_scores
    opts.checkpoint, opts.data, opts.out = Path(opts.checkpoint), Path(opts.data), Path(opts.out)
    check_options(asdict(opts))
    _check_positive(batch_size=opts.batch_size, lr=opts.lr, epochs=opts.epochs, max_steps=opts.max_steps,
                    eval_every=opts.eval_every, patience=opts.patience)
    train_part = int(opts.train) if str(opts.train).isdigit() else opts.train
    world.check_batch_size(opts.batch_size)
    paths = check_output(opts.out, [opts.checkpoint, opts.data], opts.overwrite, opts.resume, lock)
    texts, labels = read_classification_data(opts.data)
    for t in texts:
        t.group = t.group or f"line {t.line}"  # no group given: each text is its own
    split = split_by_group(texts, seed=opts.seed)
    for name in ("train", "val", "test"):
        if not getattr(split, name):
            raise DataError(f"{opts.data}: too few texts (or groups) for a train/validation/test split")
    seen = {t.label for t in split.train}
    if len(seen) < 2:
        raise DataError(f"{opts.data}: the training split holds only the label {labels[seen.pop()]!r}; "
                        "a classifier needs examples of at least two classes")
    data_hash = file_sha256(opts.data)
    resume = _resume_checkpoint(paths, data_hash, classifier=True) if opts.resume else None
    if resume is not None:
        model = GPTClassifier(resume.config, resume.labels, resume.tokenizer)
    else:
        gpt, _ = load_model(opts.checkpoint, n_heads=opts.n_heads, drop_rate=opts.drop_rate)
        set_seed(opts.seed)
        model = GPTClassifier.from_gpt(gpt, labels)
    trainable = choose_trainable(model, train_part)
    model.to(world.device)
    make = dict(tokenizer=model.tokenizer, max_length=model.config.context_length)
    train_loader = classification_loader(split.train, batch_size=opts.batch_size, seed=opts.seed, **make)
    val_loader = classification_loader(split.val, batch_size=64, shuffle=False, **make)
    log(f"data: {len(split.train)} train / {len(split.val)} validation / {len(split.test)} test texts, labels "
        f"{labels}; model: {trainable:,} of {model.num_parameters():,} parameters trained ({opts.train}), on "
        f"{_where(world, opts.precision)}")
    cfg = _train_config(opts, world, epochs=opts.epochs, max_steps=opts.max_steps, lr=opts.lr,
                        weight_decay=opts.weight_decay, warmup_steps=opts.warmup_steps, schedule="constant",
                        eval_every=opts.eval_every, eval_batches=None, patience=opts.patience,
                        checkpoint_path=str(paths.progress))
    result = train(model, train_loader, val_loader, cfg, resume=resume, world=world,
                   extra_state={"data_sha256": data_hash})
    _note_skipped(result, log)
    if result.interrupted or not world.is_main:
        return _stopped(result, paths, world)
    predicted = predict_proba(model, [t.text for t in split.test]).argmax(1).tolist()
    scores = classification_scores([t.label for t in split.test], predicted)
    log(f"test split ({len(split.test)} texts): accuracy {scores['accuracy']:.3f}; {labels[1]!r}: precision "
        f"{scores['precision']:.3f}, recall {scores['recall']:.3f}, F1 {scores['f1']:.3f}")
    metrics = {"command": "classify train", "base_checkpoint": str(opts.checkpoint), "data": str(opts.data),
               "data_sha256": data_hash, "labels": labels, "trainable_parameters": trainable,
               "texts": {name: len(getattr(split, name)) for name in ("train", "val", "test")},
               "test": scores, "precision": result.precision, **_run_facts(result, world),
               "options": _plain_options(opts)}
    return _finish(model, result, paths, metrics, title=f"Classifier on {opts.data.name}")


def _stopped(result, paths: RunPaths, world: World) -> dict:
    """What a run returns when it was interrupted (progress saved), or on a process other than rank 0."""
    if result.interrupted:
        return {"interrupted": True, "steps": result.steps, "progress": str(paths.progress), "rank": world.rank}
    return {"rank": world.rank}


def _note_skipped(result, log) -> None:
    """fp16 training: say how many steps the gradient scaler skipped (their gradients overflowed)."""
    if result.skipped_steps:
        log(f"fp16: {result.skipped_steps} of {result.steps} steps skipped because their gradients overflowed "
            "(the loss scale was lowered each time)")


def _run_facts(result, world: World) -> dict:
    """How the run computed, for its metrics file: processes, and fp16 steps skipped on overflow."""
    return {"processes": world.size, "skipped_steps": result.skipped_steps}


def _plain_options(opts) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}


__all__ = ["ClassifierOptions", "FinetuneOptions", "PretrainOptions", "finetune", "pretrain", "train_classifier", "RunPaths", "EOT_ID"]
