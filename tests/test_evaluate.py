import math

import torch

from gptlib import GPTModel, bits_per_character, evaluate_loss, is_degenerate, known_word_share, window_loader
from gptlib.evaluate import response_bits_per_character
from gptlib.instructions import Example

from conftest import tiny_config


def test_degenerate_means_a_word_trigram_three_times():
    assert is_degenerate("It's a few day, and a few day, and a few day.")
    assert not is_degenerate("It's a few day, and a few, and a few.")  # "a few" twice-ish, no trigram x3
    assert not is_degenerate("")


def test_known_word_share():
    assert known_word_share("The king, the KING and a mysql", {"the", "king", "and", "a"}) == 6 / 7


def test_bits_per_character_is_the_loss_over_the_characters_spelled():
    torch.manual_seed(0)
    model = GPTModel(tiny_config(context_length=16)).eval()
    text = "To be, or not to be, that is the question. " * 20
    ids = model.tokenizer.encode(text)
    loss = evaluate_loss(model, window_loader(ids, 16, 4, shuffle=False))
    n = (len(ids) - 1) // 16 * 16
    expected = loss * n / math.log(2) / len(model.tokenizer.decode(ids[1:n + 1]))
    assert math.isclose(bits_per_character(model, ids, batch_size=4), expected, rel_tol=1e-5)


def test_response_bits_per_character_counts_response_characters():
    torch.manual_seed(0)
    model = GPTModel(tiny_config(context_length=64)).eval()
    examples = [Example("Say hi.", "", "Hi."), Example("Say bye.", "", "Goodbye, then.")]
    value = response_bits_per_character(model, examples)
    assert 0 < value < math.log2(50257) * 10
