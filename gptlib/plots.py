"""Plotting helpers, so notebooks show pictures without a page of matplotlib code."""

from __future__ import annotations


def plot_losses(history: dict, ax=None, title: str = "Loss", path=None):
    """Training and validation loss against optimizer steps (and tokens seen on a second axis).

    ``history`` is ``TrainResult.history``. Returns the matplotlib Axes; with ``path`` also saves a PNG.
    """
    import matplotlib
    if path is not None and ax is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history["step"], history["train_loss"], marker="o", ms=3, label="training")
    if any(v is not None for v in history["val_loss"]):
        ax.plot(history["step"], history["val_loss"], marker="o", ms=3, label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if history.get("tokens") and history["tokens"][-1]:
        top = ax.secondary_xaxis("top", functions=_steps_to_tokens(history))
        top.set_xlabel("labelled tokens seen (millions)", fontsize=9)
        top.tick_params(labelsize=8)
    ax.set_title(title, pad=34 if history.get("tokens") and history["tokens"][-1] else 6)
    if path is not None:
        from .files import atomic_write
        ax.figure.tight_layout()
        atomic_write(path, lambda tmp: ax.figure.savefig(tmp, format="png", dpi=120))
    return ax


def _steps_to_tokens(history: dict):
    import numpy as np
    steps, tokens = np.asarray(history["step"], float), np.asarray(history["tokens"], float) / 1e6
    return (lambda s: np.interp(s, steps, tokens), lambda t: np.interp(t, tokens, steps))
