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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, load_weights, save_checkpoint
from .device import fast_bf16, pick_device
from .errors import CheckpointError, TrainingDiverged, UserInputError
from .evaluate import evaluate_loss
from .model import IGNORE_INDEX, GPTModel


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
    grad_accum: int = 1                   # micro-batches per optimizer step
    eval_every: int = 50                  # optimizer steps between evaluations
    eval_batches: int | None = 20         # batches per evaluation (None: the whole loader)
    patience: int | None = None           # stop after this many evaluations without improvement
    checkpoint_path: str | None = None    # where to save (resumable); None saves nothing
    save_every: int | None = None         # steps between saves (default: eval_every)
    seed: int = 123
    device: str = "auto"
    precision: str = "auto"               # "auto" (bf16 where it is native: see device.fast_bf16), "bf16", "fp32"
    compile: bool = False                 # torch.compile the model (worth it on a GPU for long runs)
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
        if self.precision not in ("auto", "bf16", "fp32"):
            raise UserInputError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")


@dataclass
class TrainResult:
    history: dict                          # lists by evaluation: step, tokens, train_loss, val_loss, lr
    steps: int                             # optimizer steps done in total
    best_val_loss: float | None
    stopped_early: bool = False
    interrupted: bool = False
    seconds: float = 0.0
    step_losses: list[float] = field(default_factory=list)  # training loss of every step of this run
    precision: str = "fp32"                # what the training steps ran in: "bf16" (mixed) or "fp32"


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


def batch_loss(model: GPTModel, batch: dict, device) -> tuple[torch.Tensor, int]:
    """Mean loss of one batch on ``device``, and how many tokens had a label.

    A batch from :func:`~gptlib.data.with_replay` also holds ``replay_*`` windows of plain text: their mean loss,
    times ``replay_weight``, is added (a second forward pass, so neither part is padded to the other's length).
    """
    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    loss = model.loss(batch["input_ids"], batch["labels"], batch.get("attention_mask"))
    n_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    if "replay_input_ids" in batch:
        replay = model.loss(batch["replay_input_ids"], batch["replay_labels"])
        loss = loss + batch["replay_weight"] * replay
        n_tokens += int((batch["replay_labels"] != IGNORE_INDEX).sum())
    return loss, n_tokens


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """"bf16" or "fp32": what ``precision`` means on ``device``. "auto" is bf16 mixed precision where the hardware
    does bf16 natively (measured 1.2-1.5x faster per training step on an AVX-512 BF16 CPU: benchmarks/), else fp32."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def _autocast(device: torch.device, precision: str):
    """bf16 autocast (matmuls in bf16, weights, softmax and optimizer in fp32), or nothing for fp32."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def train(model: GPTModel, train_loader, val_loader=None, cfg: TrainConfig | None = None,
          optimizer: torch.optim.Optimizer | None = None, resume: Checkpoint | None = None,
          on_step: Callable[[int, float], None] | None = None, extra_state: dict | None = None) -> TrainResult:
    """Train ``model`` in place and return its loss history.

    ``resume`` is a :class:`~gptlib.checkpoint.Checkpoint` read from a file this function saved; training
    continues from its step with its weights and optimizer state. Ctrl-C or SIGTERM saves a resumable checkpoint
    (when ``cfg.checkpoint_path`` is set) and returns with ``interrupted=True``. A non-finite loss, gradient or
    weight raises :class:`~gptlib.errors.TrainingDiverged` naming the step; progress saved before it is kept.
    ``on_step(step, loss)`` is called after every optimizer step (for logging, or plotting as training goes).
    ``extra_state`` is stored in every checkpoint's ``train_state`` (a recipe keeps its own bookkeeping there).
    """
    cfg = cfg or TrainConfig()
    device = pick_device(cfg.device)
    model.to(device)
    start_step, history, best, bad_evals = 0, {k: [] for k in ("step", "tokens", "train_loss", "val_loss", "lr")}, None, 0
    tokens_seen = 0
    if resume is not None:
        load_weights(model, resume.model_state, source="the resumed checkpoint")
        ts = resume.train_state
        start_step, best, bad_evals = ts.get("step", 0), ts.get("best_val_loss"), ts.get("bad_evals", 0)
        tokens_seen = ts.get("tokens", 0)
        history = ts.get("history", history)
    if optimizer is None:
        optimizer = make_optimizer(model, cfg, resume.optimizer_state if resume is not None else None)

    n_batches = len(train_loader)
    if n_batches == 0:
        raise UserInputError("the training data gave no batches: is the data set empty?")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * n_batches / cfg.grad_accum)
    save_every = cfg.save_every or cfg.eval_every
    forward_model = torch.compile(model) if cfg.compile else model
    best_state = None
    precision = resolve_precision(device, cfg.precision)
    result = TrainResult(history, start_step, best, precision=precision)
    started = time.perf_counter()

    def micro_batches(first: int):
        """The stream of training batches from micro-batch ``first`` on, epoch after epoch."""
        epoch, skip = divmod(first, n_batches)
        while True:
            sampler = getattr(train_loader, "batch_sampler", None)
            for holder in (sampler, getattr(train_loader, "sampler", None)):
                if hasattr(holder, "set_epoch"):
                    holder.set_epoch(epoch)
            yield from itertools.islice(iter(train_loader), skip, None)
            epoch, skip = epoch + 1, 0

    def evaluate(step: int) -> None:
        nonlocal best, bad_evals, best_state
        train_loss = evaluate_loss(forward_model, train_loader, cfg.eval_batches, device)
        val_loss = evaluate_loss(forward_model, val_loader, cfg.eval_batches, device) if val_loader else None
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
        if cfg.checkpoint_path:
            _check_weights(model, step, cfg)  # never replace a good save with a diverged model
            save_checkpoint(cfg.checkpoint_path, model, optimizer, {
                "step": step, "total_steps": total_steps, "tokens": tokens_seen, "best_val_loss": best,
                "bad_evals": bad_evals, "history": history, "train_config": _plain(asdict(cfg)),
                **(extra_state or {})})

    step = start_step
    bar = tqdm(total=total_steps, initial=start_step, disable=not cfg.progress, desc=f"training ({precision})", unit="step")
    model.train()
    restore_sigterm = _sigterm_as_ctrl_c()
    try:
        if start_step == 0 and not history["step"]:
            evaluate(0)
        batches = micro_batches(start_step * cfg.grad_accum)
        while step < total_steps:
            step_batches = [next(batches) for _ in range(cfg.grad_accum)]
            # Dropout masks depend only on (seed, step), whatever touched the generator before (a new
            # DataLoader iterator draws from it, for one), so a resumed run repeats the original exactly.
            torch.manual_seed(_step_seed(cfg.seed, step))
            lr = learning_rate(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = 0.0
            for batch in step_batches:
                with _autocast(device, precision):
                    loss, n_tokens = batch_loss(forward_model, batch, device)
                (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                tokens_seen += n_tokens
            # the norm is needed anyway, to stop at a non-finite gradient (max_norm inf leaves gradients as they are)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            if not math.isfinite(step_loss) or not torch.isfinite(grad_norm):
                what = f"the loss ({step_loss})" if not math.isfinite(step_loss) else "the gradient"
                raise _diverged(step + 1, what, cfg)
            with _interrupts_held():  # a Ctrl-C here would leave some weights updated and the step uncounted
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            result.step_losses.append(step_loss)
            bar.update(1)
            if on_step is not None:
                on_step(step, step_loss)
            if step % cfg.eval_every == 0 or step == total_steps:
                evaluate(step)
                model.train()
                val_text = "-" if history["val_loss"][-1] is None else f"{history['val_loss'][-1]:.3f}"
                bar.set_postfix(train=f"{history['train_loss'][-1]:.3f}", val=val_text)
                if cfg.progress:
                    bar.write(f"step {step}: train loss {history['train_loss'][-1]:.3f}, val loss {val_text}")
                if cfg.patience is not None and bad_evals >= cfg.patience:
                    result.stopped_early = True
                    break
            if step % save_every == 0 and step < total_steps:
                save(step)
    except KeyboardInterrupt:
        result.interrupted = True
        optimizer.zero_grad(set_to_none=True)  # drop a half-accumulated step; the saved state is the last full one
    finally:
        bar.close()
        restore_sigterm()
    if result.stopped_early and best_state is not None:
        model.load_state_dict(best_state)
    save(step)
    result.steps, result.best_val_loss = step, best
    result.seconds = time.perf_counter() - started
    if result.interrupted and cfg.progress:
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
