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
