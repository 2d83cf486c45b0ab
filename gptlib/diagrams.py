"""Teaching pictures, drawn with matplotlib from the library's own objects so they stay true to the code.

Each function returns the matplotlib Figure (a notebook shows it with ``plt.show()``, or it is saved).
"""

from __future__ import annotations

import math

import torch

from .model import IGNORE_INDEX

# one colour per role, used by every picture
PROMPT, RESPONSE, PADDING, MASKED = "#c6dbef", "#a1d99b", "#e5e5e5", "#f7f7f7"


def _short(piece: str, width: int = 7) -> str:
    text = piece.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def draw_shifted_targets(tokenizer, text: str, max_tokens: int = 10):
    """Inputs and targets of a language model: the same tokens, shifted by one (each input predicts the next)."""
    import matplotlib.pyplot as plt

    ids = tokenizer.encode(text)[: max_tokens + 1]
    pieces = [_short(tokenizer.decode([i])) for i in ids]
    n = len(ids) - 1
    fig, ax = plt.subplots(figsize=(1.05 * n + 1.6, 2.3))
    for x in range(n):
        for y, piece, colour in ((1, pieces[x], PROMPT), (0, pieces[x + 1], RESPONSE)):
            ax.add_patch(plt.Rectangle((x + 0.05, y + 0.1), 0.9, 0.6, color=colour))
            ax.text(x + 0.5, y + 0.4, piece.replace(" ", "␣"), ha="center", va="center", fontsize=9,
                    family="monospace")
        ax.annotate("", xy=(x + 0.5, 0.72), xytext=(x + 0.5, 1.08), arrowprops=dict(arrowstyle="->", color="0.4"))
    ax.text(-0.1, 1.4, "input_ids", ha="right", va="center", fontsize=10)
    ax.text(-0.1, 0.4, "targets", ha="right", va="center", fontsize=10)
    return _drawing(fig, ax, (-1.5, n), (0, 1.8), "each position predicts the token that follows it: targets are "
                    "the inputs shifted by one (␣ is a space)")


def draw_batch_grid(batch: dict, tokenizer, max_tokens: int | None = None):
    """A padded batch as three coloured grids: what the model reads, what it is graded on, what attention sees.

    ``batch`` is a collator's output (``input_ids``, ``labels``, ``attention_mask``). Input cells are coloured by
    role: prompt, response (its label is graded) or padding; label cells show the token to predict, or -100.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    ids, labels, mask = (batch[k][:, :max_tokens] for k in ("input_ids", "labels", "attention_mask"))
    rows, cols = ids.shape
    role = torch.where(mask == 0, 2, torch.where(labels != IGNORE_INDEX, 1, 0))  # 0 not graded, 1 graded, 2 pad
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.42 * cols), 1.0 + 1.25 * rows), sharex=True)
    panels = [("input_ids (green: its label is graded, blue: no loss here, grey: padding)", role, [PROMPT, RESPONSE, PADDING],
               lambda r, c: tokenizer.decode([int(ids[r, c])])),
              ("labels (-100: no loss taken)", (labels != IGNORE_INDEX).long(), [MASKED, RESPONSE],
               lambda r, c: "-100" if labels[r, c] == IGNORE_INDEX else tokenizer.decode([int(labels[r, c])])),
              ("attention_mask", mask.long(), [PADDING, PROMPT], lambda r, c: str(int(mask[r, c])))]
    for ax, (title, values, colours, text) in zip(axes, panels):
        ax.imshow(values.numpy(), cmap=ListedColormap(colours), vmin=0, vmax=len(colours) - 1, aspect="auto")
        for r in range(rows):
            for c in range(cols):
                ax.text(c, r, _short(text(r, c), 5), ha="center", va="center", fontsize=6, family="monospace")
        ax.set_yticks(range(rows), [f"example {r}" for r in range(rows)], fontsize=8)
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_xticks(range(0, cols, 5))
        ax.tick_params(axis="x", labelsize=7)
    axes[-1].set_xlabel("position")
    fig.tight_layout()
    return fig


def _drawing(fig, ax, xlim, ylim, title: str, fontsize: int = 10):
    """Finish a box-and-arrow drawing: its extent (y may run downwards), no axes, a title."""
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.axis("off")
    ax.set_title(title, fontsize=fontsize)
    fig.tight_layout()
    return fig


def _box(ax, x, y, text, colour, w=2.6, h=0.55, fontsize=9):
    import matplotlib.patches as patches
    ax.add_patch(patches.FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05", fc=colour,
                                        ec="0.3", lw=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, start, end, text=None, side=0.15):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", color="0.3", lw=1))
    if text:
        ax.text(start[0] + side, (start[1] + end[1]) / 2, text, fontsize=7.5, va="center", color="0.25",
                family="monospace")


def draw_transformer_block(emb_dim: int = 128, n_heads: int = 4):
    """GPT-2's pre-LayerNorm block: normalise, attend, add back; normalise, MLP, add back."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 6.2))
    steps = [(0.0, "x  (batch, tokens, emb_dim)", "white"), (1.1, "LayerNorm (norm1)", "#fde0c5"),
             (2.2, f"causal multi-head attention\n{n_heads} heads of {emb_dim // n_heads}", "#c6dbef"),
             (3.3, "+", "white"), (4.4, "LayerNorm (norm2)", "#fde0c5"),
             (5.5, f"MLP: Linear {emb_dim}→{4 * emb_dim}, GELU,\nLinear {4 * emb_dim}→{emb_dim}", "#a1d99b"),
             (6.6, "+", "white")]
    for y, text, colour in steps:
        _box(ax, 0, y, text, colour, w=0.6 if text == "+" else 2.9, h=0.45 if text == "+" else 0.62)
    for (y0, _, _), (y1, _, _) in zip(steps, steps[1:]):
        _arrow(ax, (0, y0 + 0.32), (0, y1 - 0.32))
    for start, end in ((0.0, 3.3), (3.3, 6.6)):  # the residual connections go around
        ax.plot([0.35 + 1.2, 1.9, 1.9, 0.35], [start, start, end, end], color="tab:red", lw=1.2)
        ax.text(2.0, (start + end) / 2, "residual\n(x + …)", color="tab:red", fontsize=8, va="center")
    _arrow(ax, (0, 6.85), (0, 7.5))
    ax.text(0, 7.65, "to the next block, same shape", ha="center", fontsize=8)
    return _drawing(fig, ax, (-2, 3), (7.9, -0.6), "one transformer block (pre-LayerNorm)")


def draw_gpt(config, batch: int = 2, tokens: int = 6):
    """The whole GPT as a column of steps, with the tensor shape on every arrow for ``batch`` x ``tokens`` ids."""
    import matplotlib.pyplot as plt

    b, t, d, v = batch, tokens, config.emb_dim, config.vocab_size
    steps = [("token ids", "white", f"({b}, {t})"),
             (f"token embedding {v:,} × {d}\n+ position embedding {config.context_length} × {d}", "#fde0c5",
              f"({b}, {t}, {d})"),
             (f"{config.n_layers} transformer blocks\n(each: LayerNorm, attention, +, LayerNorm, MLP, +)", "#c6dbef",
              f"({b}, {t}, {d})"),
             ("final LayerNorm", "#fde0c5", f"({b}, {t}, {d})"),
             (f"LM head: Linear {d} → {v:,}" + ("\n(tied to the token embedding)" if config.tie_weights else ""),
              "#a1d99b", f"({b}, {t}, {v:,})"),
             ("logits: a score for every possible next token", "white", None)]
    fig, ax = plt.subplots(figsize=(6.4, 6.2))
    for i, (text, colour, shape) in enumerate(steps):
        _box(ax, 0, 1.2 * i, text, colour, w=4.2, h=0.7, fontsize=8.5)
        if shape:
            _arrow(ax, (0, 1.2 * i + 0.37), (0, 1.2 * (i + 1) - 0.37), shape)
    return _drawing(fig, ax, (-2.5, 3.2), (1.2 * len(steps) - 0.4, -0.6), f"a GPT with emb_dim {d}, "
                    f"{config.n_layers} layers, {config.n_heads} heads: shapes for {b} sequences of {t} tokens",
                    fontsize=9)


def draw_training_loop():
    """The loop every training run in gptlib follows: batch, forward, backward, step; now and then evaluate and save."""
    import matplotlib.pyplot as plt

    steps = [("a batch from the DataLoader: input_ids, labels", "#fde0c5"),
             ("forward: logits → cross-entropy loss", "#c6dbef"),
             ("backward: gradients (clipped to norm 1)", "#c6dbef"),
             ("AdamW step, learning rate from the schedule", "#a1d99b")]
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    for i, (text, colour) in enumerate(steps):
        _box(ax, 0, 1.1 * i, text, colour, w=4.4, h=0.6, fontsize=8.5)
        if i:
            _arrow(ax, (0, 1.1 * (i - 1) + 0.32), (0, 1.1 * i - 0.32))
    ax.annotate("", xy=(-2.25, 0), xytext=(-2.25, 3.3),
                arrowprops=dict(arrowstyle="->", color="tab:red", connectionstyle="bar,fraction=-0.12"))
    ax.text(-3.05, 1.65, "next\nstep", color="tab:red", fontsize=8.5, ha="center", va="center")
    _box(ax, 4.3, 3.3, "every eval_every steps:\nvalidation loss, checkpoint", "#e5e5e5", w=2.7, h=0.75, fontsize=8)
    ax.annotate("", xy=(2.9, 3.3), xytext=(2.25, 3.3), arrowprops=dict(arrowstyle="->", color="0.3", ls="--"))
    return _drawing(fig, ax, (-3.6, 5.8), (4.0, -0.6), "the training loop (gptlib.train): one turn is one optimizer "
                    "step")


def plot_learning_rate(cfg, total_steps: int, ax=None):
    """The learning rate at every step of a run with this :class:`~gptlib.train.TrainConfig`."""
    import matplotlib.pyplot as plt

    from .train import learning_rate
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    steps = range(total_steps)
    ax.plot(list(steps), [learning_rate(s, total_steps, cfg) for s in steps], color="tab:purple")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"warmup {cfg.warmup_steps} steps, then {cfg.schedule}", fontsize=10)
    ax.grid(alpha=0.3)
    return ax.figure


@torch.no_grad()
def plot_attention(model, text: str, layer: int = 0, heads: list[int] | None = None):
    """Attention weights of one layer's heads for ``text`` under a (trained) model: row i is what token i looks at."""
    import matplotlib.pyplot as plt

    tokenizer = model.tokenizer
    ids = torch.tensor([tokenizer.encode(text)], device=model.device)
    weights = attention_weights(model, ids, layer)[0]  # (heads, tokens, tokens)
    heads = heads if heads is not None else list(range(weights.shape[0]))
    pieces = [repr(tokenizer.decode([i]))[1:-1] for i in ids[0].tolist()]
    fig, axes = plt.subplots(1, len(heads), figsize=(3.3 * len(heads), 3.6), squeeze=False)
    for ax, head in zip(axes[0], heads):
        ax.imshow(weights[head].cpu().numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(pieces)), pieces, rotation=90, fontsize=7)
        ax.set_yticks(range(len(pieces)), pieces, fontsize=7)
        ax.set_title(f"layer {layer}, head {head}", fontsize=9)
    fig.tight_layout()
    return fig


@torch.no_grad()
def attention_weights(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Softmax attention weights of ``layer`` for a batch of ids: (batch, heads, tokens, tokens).

    The model's own attention uses a fused kernel that never forms the weights, so they are recomputed here from
    the block's input, with the block's own projections.
    """
    x = model.tok_emb(ids) + model.pos_emb(torch.arange(ids.shape[1], device=ids.device))
    for block in model.blocks[:layer]:
        x = block(x)
    att = model.blocks[layer].att
    b, t, _ = x.shape
    q, k, _ = att.qkv(model.blocks[layer].norm1(x)).split(model.config.emb_dim, dim=2)
    q, k = (z.view(b, t, model.config.n_heads, -1).transpose(1, 2) for z in (q, k))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=ids.device).tril(), float("-inf"))
    return scores.softmax(-1)


def draw_token_losses(rows: dict, title: str = "loss of every answer token (nats): darker is more surprising"):
    """Answers as strips of tokens, each coloured by the model's loss on it; the mean of a strip is its loss.

    ``rows`` maps a label to ``(pieces, losses)``, as :func:`gptlib.evaluate.response_token_losses` returns them.
    """
    import matplotlib.pyplot as plt

    width = max(len(pieces) for pieces, _ in rows.values())
    top = max(max(losses) for _, losses in rows.values())
    cmap = plt.get_cmap("Reds")
    fig, ax = plt.subplots(figsize=(min(0.62 * width + 3.2, 16), 0.55 * len(rows) + 1.2))
    for r, (label, (pieces, losses)) in enumerate(rows.items()):
        y = len(rows) - 1 - r
        for x, (piece, loss) in enumerate(zip(pieces[:width], losses)):
            ax.add_patch(plt.Rectangle((x + 0.04, y + 0.1), 0.92, 0.8, color=cmap(0.1 + 0.85 * loss / top)))
            ax.text(x + 0.5, y + 0.5, _short(piece.replace(" ", "␣"), 6), ha="center", va="center", fontsize=7,
                    family="monospace", color="white" if loss > 0.6 * top else "black")
        ax.text(-0.2, y + 0.5, f"{label}  (mean {sum(losses) / len(losses):.2f})", ha="right", va="center",
                fontsize=8.5)
    return _drawing(fig, ax, (-0.2, width), (0, len(rows)), title, fontsize=9)


def draw_task_evaluation(n_words: int, n_unseen: int, n_play_words: int, split_sizes: tuple[int, int, int]):
    """How notebook 05 measures instruction following: which words and examples each number is allowed to see."""
    import matplotlib.pyplot as plt

    n_train, n_val, n_test = split_sizes
    fig, ax = plt.subplots(figsize=(10.5, 4.6))
    _box(ax, 2.5, 5, f"common words ({n_words:,})", PROMPT, w=3.4)
    _box(ax, 1.0, 3.7, f"training words ({n_words - n_unseen:,})", PROMPT, w=2.8)
    _box(ax, 4.4, 3.7, f"unseen words ({n_unseen:,})\nnever in any training example", "#fdd0a2", w=3.3, h=0.75)
    _box(ax, 1.0, 2.4, f"task examples ({n_train + n_val + n_test:,})", PROMPT, w=2.8)
    _box(ax, 8.0, 3.7, f"words from the plays ({n_play_words:,})\nunseen words left out", PROMPT, w=3.4, h=0.75)
    _box(ax, 8.0, 2.4, "more training examples", PROMPT, w=3.0)
    _box(ax, -0.3, 1.1, f"train {n_train:,}", RESPONSE, w=1.7)
    _box(ax, 1.6, 1.1, f"validation {n_val:,}", PADDING, w=1.9)
    _box(ax, 3.6, 1.1, f"test {n_test:,}", "#fdd0a2", w=1.7)
    _box(ax, 6.2, 1.1, "unseen-word examples", "#fdd0a2", w=2.7)
    _box(ax, 0.9, -0.2, "fine-tune (loss on the answer only)", RESPONSE, w=3.7)
    _box(ax, 6.5, -0.2, "exact match, per task: seen words / unseen words", "#fdd0a2", w=4.9)
    for start, end in [((2.0, 4.7), (1.3, 4.0)), ((3.0, 4.7), (4.0, 4.1)), ((1.0, 3.4), (1.0, 2.7)),
                       ((8.0, 3.3), (8.0, 2.7)), ((0.6, 2.1), (-0.2, 1.4)), ((1.1, 2.1), (1.5, 1.4)),
                       ((1.5, 2.1), (3.4, 1.4)), ((4.8, 3.3), (6.1, 1.4)), ((-0.3, 0.8), (0.2, 0.1)),
                       ((7.0, 2.1), (2.2, 0.1)), ((3.6, 0.8), (5.4, 0.1)), ((6.2, 0.8), (6.4, 0.1))]:
        _arrow(ax, start, end)
    ax.text(-1.2, -0.75, "validation steers training (its loss is watched); only test and unseen-word examples are "
            "scored, once, after training", fontsize=8, color="0.3")
    return _drawing(fig, ax, (-1.3, 10.0), (-0.95, 5.5), "which examples each number sees")


def draw_last_token(batch: dict, tokenizer, labels: list[str], max_tokens: int = 24, note: str = ""):
    """Where a GPT classifier reads a padded batch: the hidden state of each row's last real token.

    ``batch`` is a :class:`~gptlib.classify.ClassificationCollator` output; the picked cell is the one
    :func:`~gptlib.classify.last_token_index` finds, for right and left padding alike.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from .classify import last_token_index

    ids, mask = batch["input_ids"], batch["attention_mask"]
    last = last_token_index(mask)
    start = max(0, ids.shape[1] - max_tokens) if bool(mask[:, -1].all()) else 0  # left padding: show the ends
    cols = min(max_tokens, ids.shape[1])
    role = mask.clone().long()  # 0 padding, 1 a real token, 2 the token the head reads
    role[torch.arange(len(ids)), last] = 2
    window = role[:, start:start + cols]
    fig, ax = plt.subplots(figsize=(0.5 * cols + 3.2, 0.62 * len(ids) + 1.3))
    ax.imshow(window.numpy(), cmap=ListedColormap([PADDING, PROMPT, RESPONSE]), vmin=0, vmax=2, aspect="auto")
    for r in range(len(ids)):
        for c in range(cols):
            piece = tokenizer.decode([int(ids[r, start + c])]) if mask[r, start + c] else "pad"
            ax.text(c, r, _short(piece.replace(" ", "␣"), 5), ha="center", va="center", fontsize=6.5,
                    family="monospace")
        label = labels[int(batch["labels"][r])] if "labels" in batch else ""
        ax.annotate(f"→ cls_head → P({label})" if label else "→ cls_head", xy=(cols - 0.4, r),
                    xytext=(cols + 0.2, r), va="center", fontsize=8, annotation_clip=False)
    ax.set_yticks(range(len(ids)), [f"text {r}" for r in range(len(ids))], fontsize=8)
    ax.set_xticks([])
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_title(f"{note + ': ' if note else ''}the classifier reads one hidden state per text, at its last real "
                 "token (green); padding (grey) is masked out", fontsize=9, loc="left")
    fig.tight_layout()
    return fig
