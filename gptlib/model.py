"""GPT-2's architecture in one readable file.

Learned position embeddings, pre-LayerNorm blocks (eps 1e-5), causal multi-head attention through
``scaled_dot_product_attention``, a 4x MLP with tanh-approximated GELU, a final LayerNorm and the LM head.

Two things here exist for speed and are worth knowing about:
- ``KVCache`` keeps the keys and values of earlier tokens, so generation computes each new token once;
- ``GPTModel.loss`` runs the LM head only where a label exists (prompt and padding tokens cost nothing there),
  and on many labelled tokens (pretraining) goes through ``chunked_head_loss``, which never holds the full
  (tokens, vocab) logits tensor: 412 MB in fp32 for a batch of 8 x 256 with GPT-2's vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig

IGNORE_INDEX = -100  # label value meaning "take no loss here" (PyTorch's cross_entropy default)
CHUNKED_LOSS_MIN_ROWS = 1024  # labelled tokens from which chunked_head_loss is used (measured: benchmarks/)
LOSS_CHUNK_ROWS = 256  # rows of logits alive at once in chunked_head_loss: 256 x 50257 fp32 = 51 MB


class KVCache:
    """Preallocated keys and values for every layer: (n_layers, batch, heads, max_len, head_dim).

    Filling a preallocated buffer avoids a ``torch.cat`` (and a new allocation) per token and layer.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device=None, dtype=torch.float32):
        self.max_len = max_len or config.context_length
        shape = (config.n_layers, batch_size, config.n_heads, self.max_len, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens stored so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (batch, heads, new, head_dim) for one layer; return all keys and values."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} tokens > max_len {self.max_len}")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T`` against ``labels``, a chunk of rows at a time.

    The loss is the last operation of the graph, so its gradients are known as soon as each chunk's logits
    are: d(loss)/d(logits) = (softmax - one_hot(label)) / rows. Forward therefore computes them right away and
    drops the chunk's logits; backward only scales the stored gradients. Same FLOPs as the plain loss, no
    recomputation, and peak memory of one chunk of logits instead of all of them.
    """

    @staticmethod
    def forward(ctx, h, weight, labels, chunk_size):
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            hc, yc = h[start:start + chunk_size], labels[start:start + chunk_size]
            logits = (hc @ weight.t()).float()  # (chunk, vocab)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(yc), device=h.device), yc] -= 1
            grad = grad.to(h.dtype)
            torch.mm(grad, weight, out=grad_h[start:start + chunk_size])
            grad_w.addmm_(grad.t(), hc)
        n = h.shape[0]
        ctx.save_for_backward(grad_h.div_(n), grad_w.div_(n))
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None


def chunked_head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      chunk_size: int = LOSS_CHUNK_ROWS) -> torch.Tensor:
    """``F.cross_entropy(h @ weight.T, labels)`` for (rows, emb_dim) ``h``, never holding all the logits."""
    return _ChunkedHeadLoss.apply(h, weight, labels, chunk_size)


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


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


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
    """

    def __init__(self, config: GPTConfig | dict):
        super().__init__()
        if isinstance(config, dict):
            config = GPTConfig.from_dict(config)
        self.config = config
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
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

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

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over positions whose label is not -100, computing logits only there."""
        h = self.hidden_states(input_ids, attention_mask)
        keep = labels != IGNORE_INDEX
        if not keep.any():
            raise ValueError("no position in this batch has a label: every label is -100")
        h, labels = h[keep], labels[keep]  # (labelled tokens, emb_dim): prompt and padding never reach the head
        if len(labels) >= CHUNKED_LOSS_MIN_ROWS and torch.is_grad_enabled() and not _autocast_on(h.device):
            return chunked_head_loss(h, self.out_head.weight, labels)  # faster, and no full logits tensor
        return F.cross_entropy(self.out_head(h).float(), labels)
