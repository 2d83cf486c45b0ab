"""Tokenizers: GPT-2's byte-pair encoding, or a byte-level BPE trained on your own text. One interface for both.

Both kinds have ``encode``, ``decode``, ``token_bytes`` (for streaming), ``eot_id``, ``vocab_size`` and ``name``,
and both are byte-level: any Unicode text round-trips exactly. A checkpoint stores its tokenizer (``to_dict``),
so one ``.pth`` file is a complete model; files without one mean GPT-2.

- :class:`GPT2Tokenizer` runs GPT-2's BPE through tiktoken, built from a rank file shipped with gptlib
  (``assets/gpt2.tiktoken``, from the openai-whisper source distribution, MIT licence, see
  ``assets/LICENSE-gpt2-tiktoken``): ``tiktoken.get_encoding("gpt2")`` would download it, this never does.
- :class:`BPETokenizer` wraps a Hugging Face ``tokenizers`` byte-level BPE, stored as ``tokenizer.json`` text;
  :func:`train_bpe` fits one to a corpus in seconds. A vocabulary fitted to the corpus makes the output layer
  (one row per token) many times smaller than GPT-2's 50,257 for about the same tokens per character.
"""

from __future__ import annotations

import base64
import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

END_OF_TEXT = "<|endoftext|>"
EOT_ID = 50256      # GPT-2's end-of-text id; a trained BPE has its own (``tokenizer.eot_id``)
VOCAB_SIZE = 50257  # GPT-2's vocabulary size
_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


PRETOKENIZE_PATTERN = r50k_pat_str  # splits text into words, numbers, punctuation and spaces before BPE


# ---------------------------------------------------------------- GPT-2 (tiktoken)

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
    """The GPT-2 tokenizer as a tiktoken ``Encoding``, identical to ``tiktoken.get_encoding("gpt2")``, offline."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=PRETOKENIZE_PATTERN,
        mergeable_ranks=_load_ranks(),
        special_tokens={END_OF_TEXT: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


class GPT2Tokenizer:
    """GPT-2's BPE: 50,257 entries, learned on web text."""

    name = "gpt2"
    vocab_size = VOCAB_SIZE
    eot_id = EOT_ID

    def encode(self, text: str) -> list[int]:
        """Text to ids; ``<|endoftext|>`` in the text becomes the single end-of-text id."""
        return get_tokenizer().encode(text, allowed_special={END_OF_TEXT})

    def decode(self, ids) -> str:
        return get_tokenizer().decode(_as_list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a character can span tokens: join bytes, then decode)."""
        return get_tokenizer().decode_single_token_bytes(int(token_id))

    def to_dict(self) -> dict:
        return {"kind": "gpt2"}

    def __eq__(self, other) -> bool:
        return isinstance(other, GPT2Tokenizer)

    def __hash__(self) -> int:
        return hash("gpt2")

    def __repr__(self) -> str:
        return "GPT2Tokenizer(vocab_size=50257)"


GPT2 = GPT2Tokenizer()


# ---------------------------------------------------------------- a BPE trained on your text

class BPETokenizer:
    """A byte-level BPE from Hugging Face ``tokenizers``, with ``<|endoftext|>`` as its one special token.

    Byte-level means the base alphabet is the 256 bytes, so nothing is ever unknown and decoding gives back the
    exact text; no normalisation is applied (it would change the text).
    """

    def __init__(self, tokenizer_json: str, name: str | None = None):
        from tokenizers import Tokenizer
        try:
            self._tok = Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises its own exception types for a bad file
            raise ValueError(f"not a valid tokenizer.json: {str(exc).splitlines()[0]}") from None
        self._json = tokenizer_json
        eot = self._tok.token_to_id(END_OF_TEXT)
        if eot is None:
            raise ValueError(f"the tokenizer has no {END_OF_TEXT} token; train it with gptlib.train_bpe")
        self.eot_id = eot
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.name = name or f"bpe-{self.vocab_size}"
        self._bytes_of = _byte_decoder()

    @classmethod
    def load(cls, path) -> "BPETokenizer":
        """Read a ``tokenizer.json`` file."""
        return cls(Path(path).read_text(encoding="utf-8"))

    def save(self, path) -> None:
        from .files import atomic_write
        atomic_write(Path(path), lambda tmp: tmp.write_text(self._json, encoding="utf-8"))

    @property
    def hf_tokenizer(self):
        """The underlying ``tokenizers.Tokenizer`` (for Hugging Face's ``PreTrainedTokenizerFast``)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(i) for i in _as_list(ids)).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        token = self._tok.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"token id {token_id} is outside the tokenizer's vocabulary of {self.vocab_size}")
        if token == END_OF_TEXT:
            return token.encode("utf-8")
        return bytes(self._bytes_of[ch] for ch in token)

    def to_dict(self) -> dict:
        return {"kind": "bpe", "name": self.name, "tokenizer_json": self._json}

    def _identity(self) -> str:
        """Vocabulary and merges only: the same tokenizer saved by another program (HF adds fields) is equal."""
        model = json.loads(self._json)["model"]
        return json.dumps([model.get("vocab"), model.get("merges"), self.eot_id], sort_keys=True)

    def __eq__(self, other) -> bool:
        return isinstance(other, BPETokenizer) and other._identity() == self._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def __repr__(self) -> str:
        return f"BPETokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: byte-level BPE spells every byte with one of these characters
    (in GPT-2's vocab.json and merges.txt, and in a ``tokenizers`` ByteLevel vocabulary)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse table: a byte-level token's characters back to its bytes."""
    return {ch: byte for byte, ch in bytes_to_unicode().items()}


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, name: str | None = None,
              split_digits: bool = False) -> BPETokenizer:
    """Fit a byte-level BPE with ``vocab_size`` entries (256 bytes, ``<|endoftext|>`` and learned merges).

    Words are split before merging exactly as GPT-2 does (the same pattern), so a space stays attached to
    the word after it and prompt and response tokenise the same apart as together. ``split_digits`` also cuts
    every number into single digits first (as Llama and PaLM do), so "57" and "571" share their digit tokens
    and a model can learn arithmetic digit by digit instead of memorising a token per number.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes, <|endoftext|> and one merge), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok.to_str(), name=name)


# ---------------------------------------------------------------- choosing and storing

Tokenizer = GPT2Tokenizer | BPETokenizer


def tokenizer_from_dict(stored: dict | None) -> Tokenizer:
    """The tokenizer a checkpoint stored (``to_dict``); ``None`` (an older or foreign file) means GPT-2."""
    if stored is None or stored.get("kind") == "gpt2":
        return GPT2
    if stored.get("kind") == "bpe" and isinstance(stored.get("tokenizer_json"), str):
        return BPETokenizer(stored["tokenizer_json"], name=stored.get("name"))
    raise ValueError(f"unknown tokenizer kind {stored.get('kind')!r}; this gptlib reads 'gpt2' and 'bpe'")


def _as_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


def encode(text: str, tokenizer=None) -> list[int]:
    """Text to token ids with ``tokenizer`` (default GPT-2); ``<|endoftext|>`` becomes the end-of-text id."""
    if tokenizer is None:
        return GPT2.encode(text)
    if isinstance(tokenizer, tiktoken.Encoding):
        return tokenizer.encode(text, allowed_special={END_OF_TEXT})
    return tokenizer.encode(text)


def decode(ids, tokenizer=None) -> str:
    """Token ids (a list or a 1-D tensor) back to text with ``tokenizer`` (default GPT-2)."""
    if isinstance(tokenizer, tiktoken.Encoding):
        return tokenizer.decode(_as_list(ids))
    return (tokenizer or GPT2).decode(ids)


def read_corpus(paths: Iterable) -> Iterable[str]:
    """The texts of ``.txt`` files and of the string fields of ``.jsonl`` files, one document at a time."""
    for path in paths:
        path = Path(path)
        if path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8-sig").splitlines():
                if line.strip():
                    row = json.loads(line)
                    yield "\n".join(v for v in row.values() if isinstance(v, str)) if isinstance(row, dict) else ""
        else:
            yield path.read_text(encoding="utf-8-sig")
