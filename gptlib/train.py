"""One training loop for pretraining and fine-tuning.

AdamW with warmup then cosine decay, gradient clipping and accumulation, evaluation every N steps,
early stopping, a progress bar, a loss history for plots, atomic checkpoints and exact resume.

Resuming reaches the same weights as an uninterrupted run on CPU: batch order depends only on the seed and
the epoch (see ``gptlib.data``), and the random generator that drives dropout is re-seeded from
(seed, step) at every step, so nothing depends on what ran before the restart.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import signal
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, load_weights, save_checkpoint
from .device import fast_bf16, pick_device
from .distributed import World
from .errors import CheckpointError, TrainingDiverged, UserInputError
from .evaluate import loss_totals
from .model import GPTModel
from .step import StepLoss, batch_loss, label_count, pieces  # noqa: F401 - batch_loss: gptlib.train's before


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# fp16 training skips a step whose gradients overflowed and halves the loss scale; this many in a row is divergence
MAX_SKIPPED_IN_A_ROW = 25


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None          # stop after this many optimizer steps (overrides epochs)
    lr: float = 5e-4
    min_lr_ratio: float = 0.1             # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    schedule: str = "cosine"              # or "constant" (after warmup)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    grad_accum: int = 1                   # loader batches per optimizer step
    micro_batch_size: int | None = None   # at most this many rows per forward pass (None: a process's whole share)
    eval_every: int = 50                  # optimizer steps between evaluations
    eval_batches: int | None = 20         # batches per evaluation (None: the whole loader)
    patience: int | None = None           # stop after this many evaluations without improvement
    checkpoint_path: str | None = None    # where to save (resumable); None saves nothing
    save_every: int | None = None         # steps between saves (default: eval_every)
    seed: int = 123
    device: str = "auto"
    precision: str = "auto"               # "auto" (see resolve_precision), "bf16", "fp16" or "fp32"
    compile: bool = False                 # torch.compile the training step's forward pass (see benchmarks/README)
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "grad_accum", "eval_every"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserInputError(f"learning rate must be positive, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserInputError(f"max_steps must be positive, got {self.max_steps}")
        if self.schedule not in ("cosine", "constant"):
            raise UserInputError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise UserInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise UserInputError(f"micro_batch_size must be a positive integer, got {self.micro_batch_size}")


@dataclass
class TrainResult:
    history: dict                          # lists by evaluation: step, tokens, train_loss, val_loss, lr
    steps: int                             # optimizer steps done in total
    best_val_loss: float | None
    stopped_early: bool = False
    interrupted: bool = False
    seconds: float = 0.0
    step_losses: list[float] = field(default_factory=list)  # training loss of every step of this run
    precision: str = "fp32"                # what the training steps ran in: "bf16" or "fp16" (mixed), or "fp32"
    skipped_steps: int = 0                 # fp16: steps skipped because the scaled gradients overflowed


def learning_rate(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr``, then cosine decay to ``cfg.lr * cfg.min_lr_ratio`` (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: GPTModel, cfg: TrainConfig, state: dict | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on biases or LayerNorm), as GPT-2 did.

    Given a saved optimizer ``state`` with a single parameter group (the seed guide's
    ``AdamW(model.parameters())``), the same single group is built so the state fits.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if state is not None and len(state.get("param_groups", [])) == 1:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    else:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:  # fused AdamW updates every parameter in one kernel: ~8x faster than the per-tensor loop on CPU
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    except (RuntimeError, TypeError, ValueError):  # an older torch or a device without it
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=True)
    if state is not None:
        chosen = [(g["weight_decay"], g["betas"], g["fused"], g["foreach"]) for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit this model ({exc})") from None
        for group, settings in zip(optimizer.param_groups, chosen):
            group["weight_decay"], group["betas"], group["fused"], group["foreach"] = settings  # this run's win
    return optimizer


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """"bf16", "fp16" or "fp32": what ``precision`` means on ``device``.

    "auto" is bf16 mixed precision where the hardware does bf16 natively (measured 1.2-1.5x faster per training
    step than fp32 on an AVX-512 BF16 CPU: benchmarks/); fp16 mixed precision with a gradient scaler on CUDA GPUs
    without bf16 (a T4 or V100: Colab's free GPU), whose tensor cores run fp16 many times faster than fp32; fp32
    elsewhere (other CPUs, Apple's MPS).
    """
    if precision != "auto":
        return precision
    device = torch.device(device)
    if fast_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def _autocast(device: torch.device, precision: str):
    """bf16 or fp16 autocast (matmuls in 16 bits; weights, softmax, loss and optimizer in fp32), or nothing."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(device, precision))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _compiled_blocks(model: GPTModel, enabled: bool = True):
    """``torch.compile`` each transformer block for the length of training, as torchtune does: every block runs
    the same code, so one compiled graph serves them all and compiling takes seconds rather than minutes; the loss
    head (already chunked by hand) stays eager. Afterwards the blocks are eager again: generation calls them with
    a KV cache, which would only make the compiler trace them anew."""
    blocks = list(model.blocks) if enabled else []
    for block in blocks:
        block.compile()
    try:
        yield
    finally:
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile() set


def _eager():
    """Evaluate without the compiled blocks (torch >= 2.6; before, evaluation compiles them once more)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _fingerprint(loader) -> int:
    """A number that differs, almost surely, between loaders that give different batches: from their length and
    their first batch's token ids."""
    first = next(iter(loader))
    return (len(loader) * 1_000_003 + zlib.crc32(first["input_ids"].numpy().tobytes())) % (2**62)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def _diverged(step: int, what: str, cfg: TrainConfig) -> TrainingDiverged:
    """The error for a non-finite loss, gradient or weight: where it happened, what was kept, what to do."""
    kept, resume = "", ""
    if cfg.checkpoint_path and os.path.exists(cfg.checkpoint_path):
        kept = f"the last good progress save, {cfg.checkpoint_path}, is kept and "
        resume = ", with --resume to continue from that save or --overwrite to start over"
    return TrainingDiverged(
        f"training diverged at step {step}: {what} is not finite, so {kept}no final checkpoint was written; "
        f"the learning rate {cfg.lr:g} is probably too high: lower --lr and run again{resume}")


def _check_weights(model: GPTModel, step: int, cfg: TrainConfig) -> None:
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise _diverged(step, f"the weight {name!r} after the step", cfg)


def _sigterm_as_ctrl_c() -> Callable[[], None]:
    """Make SIGTERM (what `timeout`, Slurm, Colab and container stops send) raise KeyboardInterrupt, so it saves
    progress as Ctrl-C does. Returns the function that puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # only the main thread may set handlers

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def _interrupts_held():
    """Hold Ctrl-C and SIGTERM until the block ends, then raise KeyboardInterrupt: the block runs whole or not at all.

    The optimizer updates its parameter groups one after another; an interrupt between them, or between the update
    and the step count, would save weights that match no step, and a resumed run would differ from an
    uninterrupted one.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _stop_requests():
    """Record Ctrl-C and SIGTERM instead of raising: processes that train together must stop at the same step,
    so each asks at the end of every step whether any of them was told to stop (see ``train``)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def train(model: GPTModel, train_loader, val_loader=None, cfg: TrainConfig | None = None,
          optimizer: torch.optim.Optimizer | None = None, resume: Checkpoint | None = None,
          on_step: Callable[[int, float], None] | None = None, extra_state: dict | None = None,
          world: World | None = None) -> TrainResult:
    """Train ``model`` in place and return its loss history.

    ``resume`` is a :class:`~gptlib.checkpoint.Checkpoint` read from a file this function saved; training
    continues from its step with its weights and optimizer state. Ctrl-C or SIGTERM saves a resumable checkpoint
    (when ``cfg.checkpoint_path`` is set) and returns with ``interrupted=True``. A non-finite loss, gradient or
    weight raises :class:`~gptlib.errors.TrainingDiverged` naming the step; progress saved before it is kept.
    ``on_step(step, loss)`` is called after every optimizer step (for logging, or plotting as training goes).
    ``extra_state`` is stored in every checkpoint's ``train_state`` (a recipe keeps its own bookkeeping there).

    ``world`` (from :func:`gptlib.distributed.session`) trains together with the other processes torchrun
    started: each takes its rows of every batch, DistributedDataParallel averages the gradients, losses are
    added up over the processes, and only rank 0 shows progress and saves.
    """
    cfg = cfg or TrainConfig()
    world = world or World(device=pick_device(cfg.device))
    device = world.device if world.distributed else pick_device(cfg.device)
    model.to(device)
    start_step, history, best, bad_evals = 0, {k: [] for k in ("step", "tokens", "train_loss", "val_loss", "lr")}, None, 0
    tokens_seen = 0
    precision = resolve_precision(device, cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    result = TrainResult(history, 0, None, precision=precision)
    if resume is not None:
        load_weights(model, resume.model_state, source="the resumed checkpoint")
        ts = resume.train_state
        start_step, best, bad_evals = ts.get("step", 0), ts.get("best_val_loss"), ts.get("bad_evals", 0)
        tokens_seen = ts.get("tokens", 0)
        history = result.history = ts.get("history", history)
        result.skipped_steps = ts.get("skipped_steps", 0)
        if scaler.is_enabled() and ts.get("grad_scaler"):
            scaler.load_state_dict(ts["grad_scaler"])
    if optimizer is None:
        optimizer = make_optimizer(model, cfg, resume.optimizer_state if resume is not None else None)

    n_batches = len(train_loader)
    if n_batches == 0:
        raise UserInputError("the training data gave no batches: is the data set empty?")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * n_batches / cfg.grad_accum)
    save_every = cfg.save_every or cfg.eval_every
    world.ready()  # every process got this far: from here on they train in step
    if world.distributed:
        world.check_same("training data", _fingerprint(train_loader))
    # DistributedDataParallel must wrap the module whose forward the step calls: its hooks average the gradients
    loss_module = world.wrap(StepLoss(model))
    best_state = None
    result.steps, result.best_val_loss = start_step, best
    started = time.perf_counter()

    def loader_batches(first: int):
        """The stream of training batches from batch ``first`` on, epoch after epoch."""
        epoch, skip = divmod(first, n_batches)
        while True:
            sampler = getattr(train_loader, "batch_sampler", None)
            for holder in (sampler, getattr(train_loader, "sampler", None)):
                if hasattr(holder, "set_epoch"):
                    holder.set_epoch(epoch)
            yield from itertools.islice(iter(train_loader), skip, None)
            epoch, skip = epoch + 1, 0

    def mean_loss(loader) -> float:
        """The loader's mean loss (its first ``eval_batches`` batches), the processes sharing the batches."""
        with _eager():
            totals = loss_totals(model, loader, cfg.eval_batches, device, world.rank, world.size)
        total, count = world.sum(list(totals))
        if count == 0:
            raise ValueError("no labelled tokens to evaluate: every label is -100 or the loader is empty")
        return total / count

    def evaluate(step: int) -> None:
        nonlocal best, bad_evals, best_state
        train_loss = mean_loss(train_loader)
        val_loss = mean_loss(val_loader) if val_loader else None
        for name, loss in (("the training-set loss", train_loss), ("the validation loss", val_loss)):
            if loss is not None and not math.isfinite(loss):
                raise _diverged(step, f"{name} after the step ({loss})", cfg)
        for key, value in zip(history, (step, tokens_seen, train_loss, val_loss,
                                        learning_rate(min(step, total_steps - 1), total_steps, cfg))):
            history[key].append(value)
        if val_loss is not None:
            if best is None or val_loss < best:
                best, bad_evals = val_loss, 0
                if cfg.patience is not None:
                    best_state = copy.deepcopy(model.state_dict())
            else:
                bad_evals += 1

    def save(step: int) -> None:
        if cfg.checkpoint_path and world.is_main:
            _check_weights(model, step, cfg)  # never replace a good save with a diverged model
            scaler_state = {"grad_scaler": scaler.state_dict()} if scaler.is_enabled() else {}
            save_checkpoint(cfg.checkpoint_path, model, optimizer, {
                "step": step, "total_steps": total_steps, "tokens": tokens_seen, "best_val_loss": best,
                "bad_evals": bad_evals, "history": history, "train_config": _plain(asdict(cfg)),
                "skipped_steps": result.skipped_steps, **scaler_state, **(extra_state or {})})

    def backward(batches: list[dict]) -> float:
        """Gradients of this process's share of a step's batches; returns its part of the step's loss."""
        micro = [m for batch in batches for m in pieces(batch, world.rows, cfg.micro_batch_size, 1 / cfg.grad_accum)]
        share = 0.0
        for i, pieces_now in enumerate(micro):
            on_device = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in p.items()}
                         for p in pieces_now]
            last = i == len(micro) - 1
            # only the last micro-batch's backward averages the gradients over the processes
            sync = contextlib.nullcontext() if last or not world.distributed else loss_module.no_sync()
            with sync:
                with _autocast(device, precision):
                    loss = loss_module(on_device)
                # DDP divides the sum of the processes' gradients by their number: multiply it back
                scaler.scale(loss * world.size if world.distributed else loss).backward()
            share += loss.item()
        return share

    step = start_step
    skipped_in_a_row = 0
    bar = tqdm(total=total_steps, initial=start_step, disable=not (cfg.progress and world.is_main),
               desc=f"training ({precision})", unit="step")
    model.train()
    restore_sigterm = _sigterm_as_ctrl_c() if not world.distributed else lambda: None
    with contextlib.ExitStack() as stack:
        stop_requests = stack.enter_context(_stop_requests()) if world.distributed else []
        stack.enter_context(_compiled_blocks(model, cfg.compile))
        try:
            if start_step == 0 and not history["step"]:
                evaluate(0)
            batches = loader_batches(start_step * cfg.grad_accum)
            while step < total_steps:
                step_batches = [next(batches) for _ in range(cfg.grad_accum)]
                # Dropout masks depend only on (seed, step, rank), whatever touched the generator before (a new
                # DataLoader iterator draws from it, for one), so a resumed run repeats the original exactly.
                torch.manual_seed(_step_seed(cfg.seed, step) + world.rank)
                lr = learning_rate(step, total_steps, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                share = backward(step_batches)
                tokens_seen += sum(label_count(batch) for batch in step_batches)
                step_loss, stops = world.sum([share, float(len(stop_requests))])
                scaler.unscale_(optimizer)  # clip the true gradients (a no-op unless fp16)
                # the norm is needed anyway, to stop at a non-finite gradient (max_norm inf leaves gradients as they are)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
                overflowed = scaler.is_enabled() and not torch.isfinite(grad_norm)
                if not math.isfinite(step_loss) or not (overflowed or torch.isfinite(grad_norm)):
                    what = f"the loss ({step_loss})" if not math.isfinite(step_loss) else "the gradient"
                    raise _diverged(step + 1, what, cfg)
                # a Ctrl-C here would leave some weights updated and the step uncounted (several processes: the
                # signal is only recorded, and they stop together after the step)
                with _interrupts_held() if not world.distributed else contextlib.nullcontext():
                    scaler.step(optimizer)  # fp16: skipped when the scaled gradients overflowed
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    result.skipped_steps += overflowed
                skipped_in_a_row = skipped_in_a_row + 1 if overflowed else 0
                if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    raise _diverged(step, f"the fp16 gradient ({skipped_in_a_row} steps in a row, down to a loss "
                                          f"scale of {scaler.get_scale():g})", cfg)
                result.step_losses.append(step_loss)
                bar.update(1)
                if on_step is not None:
                    on_step(step, step_loss)
                if step % cfg.eval_every == 0 or step == total_steps:
                    evaluate(step)
                    model.train()
                    val_text = "-" if history["val_loss"][-1] is None else f"{history['val_loss'][-1]:.3f}"
                    bar.set_postfix(train=f"{history['train_loss'][-1]:.3f}", val=val_text)
                    if cfg.progress and world.is_main:
                        skipped = f" ({result.skipped_steps} fp16 steps skipped)" if result.skipped_steps else ""
                        bar.write(f"step {step}: train loss {history['train_loss'][-1]:.3f}, val loss {val_text}"
                                  f"{skipped}")
                    if cfg.patience is not None and bad_evals >= cfg.patience:
                        result.stopped_early = True
                        break
                if stops and step < total_steps:  # some process was told to stop: all stop after this step
                    raise KeyboardInterrupt
                if step % save_every == 0 and step < total_steps:
                    save(step)
        except KeyboardInterrupt:
            result.interrupted = True
            optimizer.zero_grad(set_to_none=True)  # drop a half-done step; the saved state is the last full one
        finally:
            bar.close()
            restore_sigterm()
            del loss_module  # before the process group goes (see gptlib.distributed.shutdown)
    if result.stopped_early and best_state is not None:
        model.load_state_dict(best_state)
    save(step)
    result.steps, result.best_val_loss = step, best
    result.seconds = time.perf_counter() - started
    if result.interrupted and cfg.progress and world.is_main:
        where = f"; saved to {cfg.checkpoint_path} (resume from it)" if cfg.checkpoint_path else ""
        print(f"interrupted at step {step}{where}")
    return result


def _plain(value):
    """Tuples to lists, so the train config stores as plain data."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
