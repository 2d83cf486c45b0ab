"""GPT-2's architecture in one readable file.

Learned position embeddings, pre-LayerNorm blocks (eps 1e-5), causal multi-head attention through
``scaled_dot_product_attention``, a 4x MLP with tanh-approximated GELU, a final LayerNorm and the LM head.

Two things here exist for speed and are worth knowing about:
- ``KVCache`` keeps the keys and values of earlier tokens, so generation computes each new token once;
- ``GPTModel.loss`` runs the LM head only where a label exists (prompt and padding tokens cost nothing there),
  and when training goes through ``chunked_head_loss``, which never holds the full (tokens, vocab) logits
  tensor: 412 MB in fp32 for a batch of 8 x 256 with GPT-2's vocabulary;
- ``GPTModel.loss`` computes a prefix that every row of the batch shares (an instruction batch's prompt header)
  once instead of once per row: ``SharedPrefix``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig
from .tokenizer import GPT2, Tokenizer

IGNORE_INDEX = -100  # label value meaning "take no loss here" (PyTorch's cross_entropy default)
# chunked_head_loss works on LOSS_ROW_CHUNK labelled tokens at a time: their (vocab, rows) fp32 logits are 51 MB with
# GPT-2's vocabulary, and each matmul makes LOSS_VOCAB_CHUNK logits per row, a block small enough to stay in the
# CPU's cache. Measured on a 2-core CPU, forward and backward at 345 and 2,048 rows: 1.4-1.7x faster than one
# (rows, vocab) matmul and cross_entropy, in fp32 and in bf16.
LOSS_ROW_CHUNK = 256
LOSS_VOCAB_CHUNK = 2048
# A prefix shorter than this is not worth the second pass (see SharedPrefix)
MIN_SHARED_PREFIX = 8


class KVCache:
    """Preallocated keys and values for every layer: (n_layers, batch, heads, max_len, head_dim).

    Filling a preallocated buffer avoids a ``torch.cat`` (and a new allocation) per token and layer.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device=None, dtype=torch.float32):
        self.max_len = max_len or config.context_length
        shape = (config.n_layers, batch_size, config.n_heads, self.max_len, config.head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)  # only [..., :length, :] is ever read
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # tokens stored so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (batch, heads, new, head_dim) for one layer; return all keys and values."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} tokens > max_len {self.max_len}")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def rows(self, first_row: int, end_row: int, first_key: int = 0) -> "KVCache":
        """A cache for rows ``first_row:end_row`` whose key 0 is this cache's key ``first_key``: the same memory,
        so what a forward pass stores through it lands here (batched generation fills its groups this way)."""
        view = KVCache.__new__(KVCache)
        view.keys = self.keys[:, first_row:end_row, :, first_key:]
        view.values = self.values[:, first_row:end_row, :, first_key:]
        view.max_len, view.length = self.max_len - first_key, 0
        return view

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (a batch generation drops the rows that have finished), in place: the kept
        rows' stored part moves to the front of the same buffers, which then shrink to a view of that front."""
        n, end = len(rows), self.length
        for name in ("keys", "values"):
            buffer = getattr(self, name)
            buffer[:, :n, :, :end] = buffer[:, rows, :, :end]  # the right side is gathered first, then written
            setattr(self, name, buffer[:, :n])


class SharedPrefix:
    """Keys and values of the tokens that every row of a batch starts with, computed once (as a batch of one) and
    attended to by every row. Unlike ``KVCache`` it keeps the autograd graph, so training works through it: the
    gradients of all rows flow back into the one shared copy.

    Why: every prompt of an instruction batch begins with the same 24-token header ("Below is an instruction
    ..."), about 40% of the tokens of notebook 05's examples. The causal mask makes those positions' activations
    identical in every row, so computing them once gives the same loss and gradients (up to float rounding).
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0  # tokens stored so far (the prefix, once its pass is done)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.length == 0:  # the prefix's own pass: remember its keys and values
            self.keys.append(k)
            self.values.append(v)
            return k, v
        rows = k.shape[0]  # the rest of every row: the shared keys come first, viewed once per row
        return (torch.cat([self.keys[layer].expand(rows, -1, -1, -1), k], dim=2),
                torch.cat([self.values[layer].expand(rows, -1, -1, -1), v], dim=2))


def shared_prefix_length(input_ids: torch.Tensor) -> int:
    """How many leading tokens all rows of ``input_ids`` (batch, tokens) have in common, leaving at least one
    token per row to compute separately."""
    same = (input_ids == input_ids[:1]).all(dim=0)
    return min(int(same.long().cumprod(0).sum()), input_ids.shape[1] - 1)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False) -> None:
    """``out = a @ b``, or ``out += a @ b``, with no temporary when the dtypes match (fp32 out, bf16 a and b)."""
    if a.dtype != out.dtype:
        product = a @ b
        out.add_(product) if accumulate else out.copy_(product)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T`` against ``labels``, computed a block of logits at a time.

    The loss is the last operation of the graph, so its gradients are known as soon as the logits are:
    d(loss)/d(logits) = (softmax - one_hot(label)) / rows. Forward therefore computes them right away, a chunk of
    rows at a time, and drops the logits; backward only scales the stored gradients. Same FLOPs as the plain loss,
    no recomputation, and the memory of one chunk of logits instead of all of them. The logits are kept transposed,
    (vocab, rows), so that a slice of the vocabulary is one contiguous block: each matmul then writes a small block
    that stays in the CPU's cache. The softmax is done in place (no second logits-sized tensor). Matmuls run in
    ``compute_dtype`` (bf16 under autocast); logits, softmax and the accumulated gradients are fp32.
    """

    @staticmethod
    def forward(ctx, h, weight, labels, compute_dtype, row_chunk, vocab_chunk):
        n, vocab = h.shape[0], weight.shape[0]
        # fp16 cannot hold (softmax - one_hot) / n: the small probabilities divided by thousands of rows fall below
        # its range and the gradient loses them. In fp16 the 1/n is applied afterwards, to the fp32 sums.
        fold = 1 if compute_dtype == torch.float16 else n
        f32 = dict(dtype=torch.float32, device=h.device)
        w = weight.to(compute_dtype)
        grad_h = torch.zeros(h.shape, **f32)
        grad_w = torch.empty(weight.shape, **f32) if ctx.needs_input_grad[1] else None
        buffer = torch.empty(vocab * min(row_chunk, n), **f32)
        total = torch.zeros((), **f32)
        for start in range(0, n, row_chunk):
            hc, yc = h[start:start + row_chunk].to(compute_dtype), labels[start:start + row_chunk]
            rows = torch.arange(len(yc), device=h.device)
            logits = buffer[:vocab * len(yc)].view(vocab, len(yc))  # transposed: (vocab, rows)
            for v in range(0, vocab, vocab_chunk):
                _mm_into(logits[v:v + vocab_chunk], w[v:v + vocab_chunk], hc.t())
            # cross-entropy = logsumexp - target logit, and its gradient (softmax - one_hot) / n, all in place
            target = logits[yc, rows]
            peak = logits.amax(dim=0)
            sums = logits.sub_(peak).exp_().sum(dim=0)
            total += (peak + sums.log() - target).sum()
            grad = logits.mul_(1.0 / (sums * fold))
            grad[yc, rows] -= 1.0 / fold
            for v in range(0, vocab, vocab_chunk):
                g = grad[v:v + vocab_chunk].to(compute_dtype)
                _mm_into(grad_h[start:start + len(yc)], g.t(), w[v:v + vocab_chunk], accumulate=True)
                if grad_w is not None:
                    _mm_into(grad_w[v:v + vocab_chunk], g, hc, accumulate=start > 0)
        if fold != n:
            grad_h.mul_(1.0 / n)
            if grad_w is not None:
                grad_w.mul_(1.0 / n)
        # kept on ctx, not saved: they are results, not inputs (and backward scales them in place)
        ctx.grads = (grad_h.to(h.dtype), grad_w.to(weight.dtype) if grad_w is not None else None)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("chunked_head_loss supports one backward pass per forward pass")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        return grad_h.mul_(grad_out), grad_w.mul_(grad_out) if grad_w is not None else None, None, None, None, None


def chunked_head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      row_chunk: int = LOSS_ROW_CHUNK, vocab_chunk: int = LOSS_VOCAB_CHUNK) -> torch.Tensor:
    """``F.cross_entropy(h @ weight.T, labels)`` for (rows, emb_dim) ``h``, never holding all the logits.

    Under bf16 autocast the matmuls run in bf16 (as autocast would run the LM head) and the rest in fp32.
    """
    compute_dtype = _autocast_dtype(h.device) or h.dtype
    with torch.autocast(h.device.type, enabled=False):  # this function picks its own precision
        return _ChunkedHeadLoss.apply(h, weight, labels, compute_dtype, row_chunk, vocab_chunk)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.drop_rate
        # queries, keys and values from one matmul: faster than three separate ones
        self.qkv = nn.Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.out_proj = nn.Linear(config.emb_dim, config.emb_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, c = x.shape  # (batch, tokens, emb_dim)
        q, k, v = self.qkv(x).split(c, dim=2)
        # (batch, tokens, emb_dim) -> (batch, heads, tokens, head_dim)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(layer, k, v)
        # With no explicit mask, the causal mask is free: is_causal for a fresh sequence; a single new
        # token may attend to everything in the cache.
        is_causal = mask is None and past == 0 and t > 1
        if mask is None and past > 0 and t > 1:
            mask = causal_mask(t, past + t, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, t, c)  # back to (batch, tokens, emb_dim)
        return self.out_proj(y)


def causal_mask(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """Boolean (n_queries, n_keys) mask, True where attending is allowed; queries are the last n_queries keys."""
    offset = n_keys - n_queries
    q = torch.arange(n_queries, device=device)[:, None] + offset
    return torch.arange(n_keys, device=device)[None, :] <= q


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on this device right now, or None when autocast is off."""
    try:
        if not torch.is_autocast_enabled(device.type):
            return None
        return torch.get_autocast_dtype(device.type)
    except (TypeError, AttributeError):  # torch < 2.4
        if device.type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is ones followed by zeros (or all ones)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.emb_dim, 4 * config.emb_dim)
        self.proj = nn.Linear(4 * config.emb_dim, config.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.emb_dim, eps=1e-5)
        self.att = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.emb_dim, eps=1e-5)
        self.ff = FeedForward(config)
        self.drop_resid = nn.Dropout(config.drop_rate)

    def forward(self, x, mask=None, kv_cache=None, layer=0):
        x = x + self.drop_resid(self.att(self.norm1(x), mask, kv_cache, layer))
        x = x + self.drop_resid(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """A GPT-2 style decoder.

    ``model(input_ids)`` returns logits of shape (batch, tokens, vocab_size).
    ``model.loss(input_ids, labels)`` returns the mean cross-entropy over positions whose label is not -100;
    ``labels[b, t]`` is the token that should follow ``input_ids[b, t]`` (already shifted, as the collators make them).
    ``model.tokenizer`` says what the ids mean; it is saved with the weights in every checkpoint.
    """

    def __init__(self, config: GPTConfig | dict, tokenizer: Tokenizer | None = None):
        super().__init__()
        if isinstance(config, dict):
            config = GPTConfig.from_dict(config)
        self.config = config
        self.tokenizer = tokenizer
        self.tok_emb = nn.Embedding(config.vocab_size, config.emb_dim)
        self.pos_emb = nn.Embedding(config.context_length, config.emb_dim)
        self.drop_emb = nn.Dropout(config.drop_rate)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.emb_dim, eps=1e-5)
        self.out_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        if config.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layers) so deep stacks start stable
        for name, param in self.named_parameters():
            if name.endswith(("att.out_proj.weight", "ff.proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer whose ids this model reads and writes (GPT-2's when none was given)."""
        if self._tokenizer is None:
            raise ValueError(f"this model has no tokenizer: its {self.config.vocab_size:,} embedding rows are fewer "
                             f"than GPT-2's {GPT2.vocab_size:,}; build it with GPTModel(config, tokenizer=...)")
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer | None) -> None:
        if tokenizer is None and self.config.vocab_size >= GPT2.vocab_size:
            tokenizer = GPT2
        if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(f"the tokenizer {tokenizer.name!r} has {tokenizer.vocab_size:,} tokens but the model's "
                             f"embedding has only {self.config.vocab_size:,} rows (vocab_size): ids above "
                             f"{self.config.vocab_size - 1} would have no row; use a config with vocab_size >= "
                             f"{tokenizer.vocab_size}")
        self._tokenizer = tokenizer

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    @property
    def device(self) -> torch.device:
        return self.pos_emb.weight.device  # never adapted (a LoRA embedding's weight is computed on each read)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters counted once each (a tied head is not counted twice)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None) -> torch.Tensor:
        """Final-LayerNorm outputs, (batch, tokens, emb_dim): everything but the LM head.

        ``attention_mask`` (batch, all tokens so far) holds 1 for real tokens and 0 for padding; it is
        needed only for left-padded batches (right padding never influences earlier positions).
        """
        b, t = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + t > self.config.context_length:
            raise ValueError(f"sequence of {past + t} tokens is longer than the model's context_length "
                             f"({self.config.context_length}); truncate the input")
        mask = None
        if attention_mask is not None and _is_right_padded(attention_mask):
            attention_mask = None  # padding after the real tokens never affects them: the causal mask suffices
        if attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + t]
            # (batch, 1, queries, keys): causal and not padding; every token also sees itself, so a
            # padding position has one key to attend to and its (unused) output stays finite
            causal = causal_mask(t, past + t, input_ids.device)
            mask = causal[None, None] & attention_mask[:, None, None, :past + t].bool()
            mask = mask | torch.eye(t, past + t, dtype=torch.bool, device=input_ids.device).roll(past, 1)
        else:
            positions = torch.arange(past, past + t, device=input_ids.device)
        x = self.drop_emb(self.tok_emb(input_ids) + self.pos_emb(positions))  # (batch, tokens, emb_dim)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += t
        return self.final_norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (batch, tokens, vocab); with ``last_only`` just the last position's, (batch, 1, vocab)."""
        h = self.hidden_states(input_ids, attention_mask, kv_cache)
        if last_only:
            h = h[:, -1:, :]
        return self.out_head(h)

    def _shared_prefix_hidden_states(self, input_ids: torch.Tensor,
                                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden_states``, with the tokens that all rows start with computed once (see ``SharedPrefix``).

        Only where that is exact: right padding (or none), several rows, and no dropout running (rows would
        otherwise share their dropout masks on the prefix)."""
        shared = 0
        dropout_active = self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules())
        if (len(input_ids) > 1 and not dropout_active
                and (attention_mask is None or _is_right_padded(attention_mask))):
            shared = shared_prefix_length(input_ids)
        if shared < MIN_SHARED_PREFIX:
            return self.hidden_states(input_ids, attention_mask)
        prefix = SharedPrefix()
        h_prefix = self.hidden_states(input_ids[:1, :shared], kv_cache=prefix)  # (1, shared, emb_dim)
        h_rest = self.hidden_states(input_ids[:, shared:], kv_cache=prefix)   # (batch, tokens - shared, emb_dim)
        return torch.cat([h_prefix.expand(len(input_ids), -1, -1), h_rest], dim=1)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over positions whose label is not -100, computing logits only there."""
        h = self._shared_prefix_hidden_states(input_ids, attention_mask)
        keep = labels != IGNORE_INDEX
        if not keep.any():
            raise ValueError("no position in this batch has a label: every label is -100")
        h, labels = h[keep], labels[keep]  # (labelled tokens, emb_dim): prompt and padding never reach the head
        if torch.is_grad_enabled():
            # faster than the plain loss, and never a full logits tensor
            return chunked_head_loss(h, self.out_head.weight, labels, LOSS_ROW_CHUNK, LOSS_VOCAB_CHUNK)
        return F.cross_entropy(self.out_head(h).float(), labels)
