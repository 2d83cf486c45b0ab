"""GPT-2's byte-pair encoding through tiktoken, built from a rank file shipped with gptlib.

``tiktoken.get_encoding("gpt2")`` downloads its files on first use; this module builds the same
``Encoding`` from ``assets/gpt2.tiktoken`` (from the openai-whisper source distribution, MIT licence,
see ``assets/LICENSE-gpt2-tiktoken``) so that tokenising never needs the network.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from importlib import resources

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

END_OF_TEXT = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


PRETOKENIZE_PATTERN = r50k_pat_str  # splits text into words, numbers, punctuation and spaces before BPE


def bpe_ranks() -> dict[bytes, int]:
    """GPT-2's merge table: byte string -> rank (id). Lower ranks were merged earlier in training."""
    return dict(get_tokenizer()._mergeable_ranks)


def _load_ranks() -> dict[bytes, int]:
    data = resources.files("gptlib").joinpath("assets/gpt2.tiktoken").read_bytes()
    if hashlib.sha256(data).hexdigest() != _RANKS_SHA256:
        raise RuntimeError("gptlib/assets/gpt2.tiktoken is damaged (checksum mismatch): reinstall gptlib")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 tokenizer, identical to ``tiktoken.get_encoding("gpt2")``, built offline."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=PRETOKENIZE_PATTERN,
        mergeable_ranks=_load_ranks(),
        special_tokens={END_OF_TEXT: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def encode(text: str, tokenizer: tiktoken.Encoding | None = None) -> list[int]:
    """Text to token ids; ``<|endoftext|>`` in the text becomes the single id 50256."""
    tokenizer = tokenizer or get_tokenizer()
    return tokenizer.encode(text, allowed_special={END_OF_TEXT})


def decode(ids, tokenizer: tiktoken.Encoding | None = None) -> str:
    """Token ids (a list or a 1-D tensor) back to text."""
    tokenizer = tokenizer or get_tokenizer()
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return tokenizer.decode(list(ids))
