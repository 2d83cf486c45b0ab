import socket

import pytest

from gptlib import EOT_ID, decode, encode, get_tokenizer


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_gpt2_ids_without_network(no_network):
    get_tokenizer.cache_clear()
    tokenizer = get_tokenizer()
    assert tokenizer.n_vocab == 50257
    assert encode("Hello, world!") == [15496, 11, 995, 0]
    assert encode("<|endoftext|>") == [EOT_ID] == [50256]
    # well-known GPT-2 ids: " the" and a word split into pieces
    assert encode(" the") == [262]
    assert encode("Hello world") == [15496, 995]


def test_round_trip_of_unicode_and_whitespace():
    text = "Café au lait — 3.14 ☕\n\n  indented\ttab"
    assert decode(encode(text)) == text


def test_prompt_and_response_tokenise_the_same_apart_as_together():
    prompt, response = "### Response:\n", "Sure thing.<|endoftext|>"
    assert encode(prompt) + encode(response) == encode(prompt + response)


# ---------------------------------------------------------------- the trained byte-level BPE, same interface

import random

from gptlib import GPT2, BPETokenizer, train_bpe
from gptlib.tokenizer import tokenizer_from_dict

from conftest import ROOT

SARCASM = ROOT / "dataset" / "sarcasm" / "sarcasm_instruction_pairs.jsonl"


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([SARCASM.read_text(encoding="utf-8")], vocab_size=600)


def random_unicode(seed: int, n: int = 400) -> str:
    """Text from all over Unicode: ASCII, accents, CJK, emoji, combining marks, controls, CR/LF, no surrogates."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x300, 0x36F), (0x4E00, 0x4E80), (0x1F300, 0x1F64F),
              (0xE000, 0xE010), (0x10FFF0, 0x10FFFF)]
    chars = []
    for _ in range(n):
        low, high = rng.choice(ranges)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars) + "\r\n<|endoftext|>  \t"


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
@pytest.mark.parametrize("seed", range(5))
def test_any_unicode_round_trips_byte_exactly(kind, seed, bpe):
    tokenizer = GPT2 if kind == "gpt2" else bpe
    text = random_unicode(seed)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")  # what streaming prints


def test_trained_bpe_has_the_same_interface(bpe):
    assert bpe.vocab_size == 600 and bpe.name == "bpe-600"
    assert bpe.encode("<|endoftext|>") == [bpe.eot_id]
    assert max(bpe.encode(SARCASM.read_text(encoding="utf-8")[:5000])) < bpe.vocab_size
    prompt, response = "### Response:\n", "Sure thing.<|endoftext|>"
    assert bpe.encode(prompt) + bpe.encode(response) == bpe.encode(prompt + response)


def test_bpe_training_is_repeatable_and_stores_as_plain_text(bpe):
    again = train_bpe([SARCASM.read_text(encoding="utf-8")], vocab_size=600)
    assert again == bpe
    stored = bpe.to_dict()
    assert all(isinstance(v, str) for v in stored.values())  # loads under torch.load(weights_only=True)
    assert tokenizer_from_dict(stored) == bpe
    assert tokenizer_from_dict(None) is GPT2 and tokenizer_from_dict(GPT2.to_dict()) is GPT2


def test_bpe_save_and_load(bpe, tmp_path):
    bpe.save(tmp_path / "tokenizer.json")
    assert BPETokenizer.load(tmp_path / "tokenizer.json").encode("Oh, wonderful.") == bpe.encode("Oh, wonderful.")


def test_a_fitted_vocabulary_needs_few_more_tokens_than_gpt2():
    text = SARCASM.read_text(encoding="utf-8")
    small = train_bpe([text], vocab_size=2048)
    assert len(small.encode(text)) < 1.3 * len(GPT2.encode(text))  # 25x fewer entries, close in length


def test_the_byte_table_is_the_one_tokenizers_uses():
    from tokenizers.pre_tokenizers import ByteLevel

    from gptlib.tokenizer import bytes_to_unicode
    table = bytes_to_unicode()
    assert len(table) == 256 and sorted(table.values()) == sorted(ByteLevel.alphabet())


@pytest.fixture(scope="module")
def digit_bpe():
    text = SARCASM.read_text(encoding="utf-8") + "\n".join(f"What is {a} plus {a + 7}? {2 * a + 7}" for a in range(300))
    return train_bpe([text], vocab_size=600, split_digits=True)


@pytest.mark.parametrize("seed", range(3))
def test_split_digits_bpe_round_trips_any_unicode(seed, digit_bpe):
    text = random_unicode(seed) + " 0123456789 ٣٤ 12.5"
    ids = digit_bpe.encode(text)
    assert digit_bpe.decode(ids) == text
    assert b"".join(digit_bpe.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_split_digits_gives_one_token_per_digit(digit_bpe):
    pieces = [digit_bpe.decode([i]) for i in digit_bpe.encode("What is 57 plus 168? 225")]
    assert pieces[-3:] == ["2", "2", "5"] and "5" in pieces and "168" not in pieces and " 57" not in pieces
    plain = train_bpe([SARCASM.read_text(encoding="utf-8") + "\n".join(f"{a} {a}" for a in range(300))], vocab_size=600)
    assert len(plain.encode(" 225 168")) < len(digit_bpe.encode(" 225 168"))  # without it, numbers merge
